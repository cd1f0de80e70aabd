// CUDA on the CPU: just enough of CUDA C for the kernels of this project to compile with a host C++20
// compiler and run with one host thread per CUDA thread (the launcher is cuda_shim_runtime.cpp).
//
// A kernel library is one translation unit: this header, then the kernel source (the very string that CuPy
// compiles, #included verbatim), then CUDA_SHIM_EXPORT(name) for each kernel, which emits two C entry points
// for ctypes:
//   const char* cuda_shim_signature_<name>()   the parameter types, e.g. "int,float,const float*,float*"
//   int cuda_shim_launch_<name>(grid[3], block[3], schedule, params, err, err_len)
//        params[i] points at the value of argument i (as cuLaunchKernel's kernelParams); returns 0, or 1 with
//        a message in err (see cuda_shim_run in cuda_shim_runtime.cpp).
// The library links to the runtime library built from cuda_shim_runtime.cpp, which owns the built-in
// variables and runs the threads. This header stays light (no <thread>, <barrier>, <string>), so a kernel
// compiles in a fraction of a second.
//
// Supported subset (.notes/CONTRACTS.md "CUDA kernels"): __global__/__device__/__host__/__forceinline__,
// __shared__ arrays of static size, __syncthreads(), blockIdx/threadIdx/blockDim/gridDim, the math functions
// of <math.h> (fmaxf, fminf, roundf (half away from zero, as in CUDA), floorf, ceilf, ...) and CUDA's
// overloaded max/min; kernel parameters of type int, unsigned int, long long, unsigned long long, float,
// double and pointers to them. Atomics, warp intrinsics, dynamic shared memory and kernel templates are not
// provided: using them is a compile error, which is the point.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ---------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// __shared__: one copy per block, shared by the block's threads. A function-local `static` variable is one
// copy per kernel in the process, which is exactly that because blocks run one at a time and the runtime
// runs one launch at a time. The section gathers every __shared__ variable of the library, so that the
// runtime can fill them all with garbage before each block (as GPU shared memory starts undefined).
#define __shared__ static __attribute__((section("cuda_shim_shared")))

// ---- built-in variables: one per host thread, i.e. per CUDA thread, defined by the runtime library ------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

extern "C" {
// uint3 for all four (CUDA's blockDim and gridDim are dim3, which converts from uint3): trivial types, so
// the GNU __thread storage works across libraries without C++'s thread_local wrappers.
extern __thread uint3 threadIdx, blockIdx, blockDim, gridDim;

// __syncthreads(), reported with the line of the kernel source that called it.
void cuda_shim_syncthreads(int line);

// Runs body(ctx) on grid x block host threads (cuda_shim_runtime.cpp).
int cuda_shim_run(const unsigned int* grid, const unsigned int* block, int schedule, void (*body)(void*),
                  void* ctx, char* shared_begin, char* shared_end, char* err, std::size_t err_len);
}

#define __syncthreads() cuda_shim_syncthreads(__LINE__)

// ---- CUDA's overloaded max/min (device math API); the float ones are fmaxf/fminf as in CUDA ----------
__device__ inline int max(int a, int b) { return a > b ? a : b; }
__device__ inline int min(int a, int b) { return a < b ? a : b; }
__device__ inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
__device__ inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
__device__ inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
__device__ inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
__device__ inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
__device__ inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
__device__ inline long long max(long long a, long long b) { return a > b ? a : b; }
__device__ inline long long min(long long a, long long b) { return a < b ? a : b; }
__device__ inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
__device__ inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
__device__ inline float max(float a, float b) { return fmaxf(a, b); }
__device__ inline float min(float a, float b) { return fminf(a, b); }
__device__ inline double max(double a, double b) { return fmax(a, b); }
__device__ inline double min(double a, double b) { return fmin(a, b); }
__device__ inline double max(float a, double b) { return fmax(a, b); }
__device__ inline double min(float a, double b) { return fmin(a, b); }
__device__ inline double max(double a, float b) { return fmax(a, b); }
__device__ inline double min(double a, float b) { return fmin(a, b); }

namespace cuda_shim {

// The bounds of this library's __shared__ section (defined by the linker; the anchor makes it exist).
extern "C" char __start_cuda_shim_shared[] __attribute__((visibility("hidden")));
extern "C" char __stop_cuda_shim_shared[] __attribute__((visibility("hidden")));
__attribute__((section("cuda_shim_shared"), used)) static char shared_anchor;

// ---- kernel parameters: the types of the subset, named for the Python side ----------------------------
template <class T>
struct always_false : std::false_type {};

template <class T>
constexpr const char* type_name() {
  static_assert(always_false<T>::value, "kernel parameter type outside the supported subset");
  return "";
}
#define CUDA_SHIM_TYPE_NAME(T)                  \
  template <>                                   \
  constexpr const char* type_name<T>() {        \
    return #T;                                  \
  }                                             \
  template <>                                   \
  constexpr const char* type_name<T*>() {       \
    return #T "*";                              \
  }                                             \
  template <>                                   \
  constexpr const char* type_name<const T*>() { \
    return "const " #T "*";                     \
  }
CUDA_SHIM_TYPE_NAME(int)
CUDA_SHIM_TYPE_NAME(unsigned int)
CUDA_SHIM_TYPE_NAME(long long)
CUDA_SHIM_TYPE_NAME(unsigned long long)
CUDA_SHIM_TYPE_NAME(float)
CUDA_SHIM_TYPE_NAME(double)
#undef CUDA_SHIM_TYPE_NAME

// "type,type,..." of a kernel's parameters (top-level const is not part of a function's type).
template <class... A>
const char* signature(void (*)(A...)) {
  static char names[64 * (sizeof...(A) + 1)] = "";
  if (names[0] == '\0') {
    ((std::strcat(names[0] ? std::strcat(names, ",") : names, type_name<A>())), ...);
  }
  return names;
}

template <class... A>
struct Call {
  void (*kernel)(A...);
  std::tuple<A...> args;
  static void run(void* self) {
    Call& call = *static_cast<Call*>(self);
    std::apply(call.kernel, call.args);
  }
};

template <class... A, std::size_t... I>
Call<A...> unpack(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
  return Call<A...>{kernel, std::tuple<A...>(*static_cast<A*>(params[I])...)};
}

template <class... A>
int launch(void (*kernel)(A...), const unsigned int* grid, const unsigned int* block, int schedule,
           void** params, char* err, std::size_t err_len) {
  Call<A...> call = unpack(kernel, params, std::index_sequence_for<A...>{});
  return cuda_shim_run(grid, block, schedule, &Call<A...>::run, &call, __start_cuda_shim_shared,
                       __stop_cuda_shim_shared, err, err_len);
}

}  // namespace cuda_shim

// The library is built with -fvisibility=hidden: only these entry points are exported, so two libraries
// with kernels of the same name (a kernel and a mutated copy of it) loaded in one process never interpose.
#define CUDA_SHIM_API extern "C" __attribute__((visibility("default")))
#define CUDA_SHIM_EXPORT(name)                                                                          \
  CUDA_SHIM_API const char* cuda_shim_signature_##name() { return ::cuda_shim::signature(&name); }     \
  CUDA_SHIM_API int cuda_shim_launch_##name(const unsigned int* grid, const unsigned int* block,       \
                                            int schedule, void** params, char* err,                   \
                                            std::size_t err_len) {                                    \
    return ::cuda_shim::launch(&name, grid, block, schedule, params, err, err_len);                    \
  }
