"""runtime stage of llamavid-deploy."""
