"""`msfx serve`: an OpenAI-compatible HTTP server over one msfx model (FastAPI + uvicorn).

`msfx.serving.app.OpenAIServer(model, tokenizer, model_id).app()` is the ASGI app;
`msfx.serving.app.serve` loads a checkpoint and runs it with uvicorn (`msfx serve --help`).
"""
