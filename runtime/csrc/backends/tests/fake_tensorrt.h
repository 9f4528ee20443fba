// fake_tensorrt.h -- what the check (check_tensorrt.cpp) sees of the fake TensorRT and CUDA (fake_tensorrt.cpp).
#pragma once

#include <string>

struct FakeCounters
{
    int devices = 1;               // CUDA devices (0: cudaGetDeviceCount fails with cudaErrorNoDevice)
    std::string fail;              // the next CUDA call of this name fails
    long mallocs = 0, enqueues = 0;                                   // calls so far
    long buffers = 0, streams = 0, runtimes = 0, engines = 0, contexts = 0;   // alive now
};

extern FakeCounters fake;
