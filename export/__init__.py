"""export stage of llamavid-deploy."""
