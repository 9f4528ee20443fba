def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device, TensorRT or TensorRT-LLM; skipped here")
    config.addinivalue_line("markers", "slow: longer than a few seconds")
