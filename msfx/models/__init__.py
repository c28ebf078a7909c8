"""HF-named model classes (thin wrappers over `msfx.architectures`)."""
