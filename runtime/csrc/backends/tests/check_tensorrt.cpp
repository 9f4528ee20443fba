// check_tensorrt.cpp -- tensorrt.cpp's backend table driven on the CPU through the fake TensorRT and CUDA of
// fake_tensorrt.cpp: options, the built_with and tensor checks, engine files that are missing or not engines, one context
// per session, device buffers grown only for larger shapes (and no host allocation in a call at steady state), outputs
// written in place, profile / shape / enqueue / CUDA errors (the context runs again afterwards), nothing left
// allocated. Exit status 0 when every check holds.
// Built and run by tests/test_c_backends.py:
//   g++ -std=c++17 -Iruntime/csrc -Iruntime/csrc/backends -isystem TENSORRT_INCLUDE -isystem CUDA_INCLUDE
//       check_tensorrt.cpp fake_tensorrt.cpp ../tensorrt.cpp error.o       (error.o: the core's error.c)
#include "fake_tensorrt.h"
#include "llamavid_tensorrt.h"

#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <string>
#include <utility>
#include <vector>

long news = 0;                     // operator new calls (the backend allocates host memory in C++ only)

void* operator new(size_t n)
{
    ++news;
    if (void* p = std::malloc(n ? n : 1))
        return p;
    throw std::bad_alloc();
}

void operator delete(void* p) noexcept
{
    std::free(p);
}

void operator delete(void* p, size_t) noexcept
{
    std::free(p);
}

namespace
{

int checks = 0, failures = 0;

void check(bool ok, std::string const& what)
{
    ++checks;
    if (!ok)
    {
        ++failures;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

void fails(llamavid_error* e, std::string const& part, char const* what)
{
    check(e && std::strstr(llamavid_error_message(e), part.c_str()),
        std::string(what) + ": expected an error with \"" + part + "\", found \"" + llamavid_error_message(e) + "\"");
    llamavid_error_free(e);
}

void ok(llamavid_error* e, char const* what)
{
    check(!e, std::string(what) + ": " + llamavid_error_message(e));
    llamavid_error_free(e);
}

llamavid_backend* make(std::vector<std::pair<char const*, char const*>> const& options, llamavid_error** e)
{
    std::vector<char const*> keys, values;
    for (auto const& [k, v] : options)
        keys.push_back(k), values.push_back(v);
    llamavid_backend* b = nullptr;
    *e = llamavid_backend_create(LLAMAVID_API_VERSION, llamavid_error_new, keys.data(), values.data(),
        int32_t(options.size()), &b);
    return b;
}

// A variant of a toy stage x [F,4] -> y [F,4] as the core hands it over.
struct Variant
{
    std::string dir, file, backend = "tensorrt", precision = "fp32", builtWith = "tensorrt=10.3.0.26;sm=87", path;
    llamavid_tensor in{"x", LLAMAVID_F32, 2, {-1, 4}, nullptr}, out{"y", LLAMAVID_F32, 2, {-1, 4}, nullptr};

    llamavid_variant get()
    {
        path = dir + "/" + file;
        return {"head", "", backend.c_str(), precision.c_str(), file.c_str(), path.c_str(), 0, &in, 1, &out, 1,
            builtWith.c_str()};
    }
};

void write(std::string const& path, char const* text)
{
    std::ofstream(path) << text;
}

} // namespace

int main()
{
    char name[] = "/tmp/check_tensorrt_XXXXXX";
    std::string dir = mkdtemp(name);
    write(dir + "/affine.engine", "llamavid-fake-engine\nprofile 8\ninput x float32 F 4\noutput y float32 F 4\n");
    write(dir + "/broken.engine",
        "llamavid-fake-engine\nprofile 8\ninput x float32 F 4\noutput y float32 F 4\nfail enqueue\n");
    write(dir + "/garbage.engine", "not an engine");
    llamavid_error* e = nullptr;

    // ---- create ----------------------------------------------------------------------------------------------------
    make({{"colour", "red"}}, &e);
    fails(e, "unknown option \"colour\": expected device, plugin_library or precision", "unknown option");
    make({{"device", "x"}}, &e);
    fails(e, "option device: expected a CUDA device ordinal, found \"x\"", "bad device");
    make({{"device", "1"}}, &e);
    fails(e, "expected an ordinal below 1 (the CUDA devices here), found 1", "absent device");
    make({{"precision", "fp8"}}, &e);
    fails(e, "option precision: expected fp32, fp16, bf16, int8 or \"\", found \"fp8\"", "bad precision");
    make({{"plugin_library", "/nonexistent/libp.so"}}, &e);
    fails(e, "expected the plugin library file /nonexistent/libp.so, found none; build it with python -m kernels.build",
        "missing plugin library");
    fake.devices = 0;
    make({}, &e);
    fails(e, "tensorrt: expected a CUDA device, found cudaErrorNoDevice (100)", "no device");
    fake.devices = 1;
    llamavid_backend* none = nullptr;
    fails(llamavid_backend_create(0, llamavid_error_new, nullptr, nullptr, 0, &none),
        "expected llamavid API version 1, found 0", "API version");
    check(!none && fake.runtimes == 0, "failed creates leave nothing");
    llamavid_backend* b = make({{"device", "0"}, {"precision", ""}}, &e);
    ok(e, "create");
    if (!b)
        return 1;

    // ---- open_stage ------------------------------------------------------------------------------------------------
    void* stage = nullptr;
    auto open = [&](Variant& v) {
        llamavid_variant x = v.get();
        stage = nullptr;
        return b->open_stage(b->user, &x, &stage);
    };
    Variant v;
    v.dir = dir;
    v.file = "affine.engine";
    v.backend = "ort-cuda";
    ok(open(v), "another backend's variant");
    check(!stage, "another backend's variant is left to the next backend");
    v.backend = "tensorrt";
    v.file = "head_trt.onnx";
    ok(open(v), "an engine's ONNX source");
    check(!stage, "an engine's ONNX source is left to the next backend");
    v.file = "affine.engine";
    v.builtWith = "tensorrt=10.3.0.26;sm=80";
    fails(open(v), "affine.engine was built with TensorRT 10.3.0.26 for sm_80, this machine has TensorRT 10.3.0 and sm_87: "
        "rebuild the engines here (python -m export.trt --artifacts " + dir + ") or run the stage's ONNX variants",
        "another GPU");
    v.builtWith = "sm=87;tensorrt=10.4.0.1";
    fails(open(v), "built with TensorRT 10.4.0.1 for sm_87, this machine has TensorRT 10.3.0 and sm_87", "another TensorRT");
    v.builtWith = "";
    v.file = "missing.engine";
    fails(open(v), "missing.engine: expected a readable engine file, found: No such file", "missing engine");
    v.file = "garbage.engine";
    fails(open(v), "TensorRT could not deserialize the engine: fake: the file is not a fake engine; plugin library: none "
        "given", "not an engine");
    v.file = "affine.engine";
    v.out.name = "frame_tokens";
    fails(open(v), "affine.engine: the engine does not match the manifest: outputs [frame_tokens] in the manifest, not in "
        "the engine; outputs [y] in the engine, not in the manifest; rebuild it with python -m export.trt --artifacts "
        + dir, "other tensor names");
    v.out.name = "y";
    v.in.dtype = LLAMAVID_I64;
    fails(open(v), "the engine does not match the manifest: x: manifest dtype int64, engine float32", "other dtype");
    v.in.dtype = LLAMAVID_F32;
    check(fake.engines == 0, "refused engines are freed");
    llamavid_backend* fp16 = make({{"precision", "fp16"}}, &e);
    ok(e, "create fp16");
    llamavid_variant fp32 = v.get();
    ok(fp16->open_stage(fp16->user, &fp32, &stage), "precision option");
    check(!stage, "a backend for fp16 leaves an fp32 engine to the next backend");
    llamavid_backend_free(fp16);
    ok(open(v), "open");
    void* affine = stage;
    v.file = "broken.engine";
    ok(open(v), "open broken");
    void* broken = stage;
    check(affine && broken && fake.engines == 2, "engines opened");

    // ---- contexts and runs -----------------------------------------------------------------------------------------
    void *c1 = nullptr, *c2 = nullptr, *c3 = nullptr;
    ok(b->open_context(affine, &c1), "context 1");
    ok(b->open_context(affine, &c2), "context 2");
    ok(b->open_context(broken, &c3), "context 3");
    check(fake.contexts == 3 && fake.streams == 3, "a context and a stream per session");
    std::vector<float> x(36), y(36, -1.f);
    for (size_t i = 0; i < x.size(); ++i)
        x[i] = float(i % 5) - 1.5f;
    llamavid_tensor out{};
    auto run = [&](void* st, void* c, int64_t frames, int64_t yCols = 4, char const* input = "x") {
        llamavid_tensor in{input, LLAMAVID_F32, 2, {frames, 4}, x.data()};
        out = {"y", LLAMAVID_F32, 2, {frames, yCols}, y.data()};
        return b->run(st, c, &in, 1, &out, 1);
    };
    auto right = [&](int64_t frames) {                       // y = the fake engine's function of x
        for (int64_t f = 0; f < frames; ++f)
        {
            double sum = 0;
            for (int64_t j = 0; j < 4; ++j)
                sum += x[size_t(4 * f + j)];
            for (int64_t j = 0; j < 4; ++j)
                if (y[size_t(4 * f + j)] != float(sum / 4.0) + 0.01f * float(j % 7))
                    return false;
        }
        return true;
    };
    ok(run(affine, c1, 3), "run 3 frames");
    check(right(3) && fake.mallocs == 2, "outputs written in place; one buffer per tensor");
    ok(run(affine, c1, 8), "run 8 frames");
    check(right(8) && fake.mallocs == 4, "buffers grow for a larger shape");
    ok(run(affine, c1, 3), "run 3 frames again");
    long before = news;
    e = run(affine, c1, 8);
    long after = news;
    ok(e, "run 8 frames again");
    check(right(8) && fake.mallocs == 4 && fake.buffers == 2 && after == before,
        "no device or host allocation at steady state, no buffer left behind");
    ok(run(affine, c2, 2), "second session");
    check(right(2) && fake.mallocs == 6, "each session has its own buffers");
    fails(run(affine, c1, 9), "input x [9,4] is outside the engine's optimisation profile (min [1,4], opt [8,4], max "
        "[8,4]): use fewer frames", "outside the profile");
    long enqueues = fake.enqueues;
    ok(run(affine, c1, 3, 5), "another output shape");
    check(out.ndim == 2 && out.shape[0] == 3 && out.shape[1] == 4 && fake.enqueues == enqueues,
        "another output shape is told to the core (which reports it) and nothing runs");
    fails(run(affine, c1, 3, 4, "z"), "input z: expected one of the engine's inputs", "unknown input");
    fake.fail = "cudaMemcpyAsync";
    fails(run(affine, c1, 3), "cudaMemcpyAsync of input x failed: cudaErrorInvalidValue (1)", "a CUDA copy fails");
    y.assign(y.size(), -1.f);
    ok(run(affine, c1, 3), "after a failed call");
    check(right(3), "the context runs again after a failed call");
    fake.fail = "cudaMalloc";
    fails(run(affine, c2, 8), "cudaMalloc of 128 bytes for x failed: cudaErrorMemoryAllocation", "out of device memory");
    ok(run(affine, c2, 8), "after a failed allocation");
    check(right(8), "a failed allocation is retried on the next call");
    fails(run(broken, c3, 2), "enqueueV3 failed: fake: enqueue failed as the engine file asks", "enqueue fails");

    // ---- close -----------------------------------------------------------------------------------------------------
    b->close_context(affine, c1);
    b->close_context(affine, c2);
    b->close_context(broken, c3);
    b->close_stage(affine);
    b->close_stage(broken);
    llamavid_backend_free(b);
    check(fake.buffers == 0 && fake.streams == 0 && fake.contexts == 0 && fake.engines == 0 && fake.runtimes == 0,
        "everything freed");
    for (char const* f : {"affine.engine", "broken.engine", "garbage.engine"})
        unlink((dir + "/" + f).c_str());
    rmdir(dir.c_str());
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
