"""The FastAPI example shop (see its README.md); ``app.create_app`` is what uvicorn runs."""
