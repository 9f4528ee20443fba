"""calib stage of llamavid-deploy."""
