"""kernels stage of llamavid-deploy."""
