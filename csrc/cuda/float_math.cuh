// Device helpers shared by the .cu kernels: conversion to the accumulation type and back with
// one rounding, 16-byte vectors, and the host-side switch from two FloatKinds to two C++ types.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "float_kind.h"

namespace vlfast {

// fp32 math unless an operand is fp64.
template <typename... Ts>
using acc_t = std::conditional_t<(std::is_same_v<Ts, double> || ...), double, float>;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte load of the wider of two types.
template <typename A, typename B>
constexpr int kVecElems = 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));

template <typename A> __device__ __forceinline__ A to_acc(float x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A to_acc(double x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A to_acc(__half x) { return static_cast<A>(__half2float(x)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return static_cast<A>(__bfloat162float(x)); }

__device__ __forceinline__ void store(float& dst, float x) { dst = x; }
__device__ __forceinline__ void store(float& dst, double x) { dst = static_cast<float>(x); }
__device__ __forceinline__ void store(double& dst, double x) { dst = x; }
__device__ __forceinline__ void store(double& dst, float x) { dst = x; }
__device__ __forceinline__ void store(__half& dst, float x) { dst = __float2half_rn(x); }
__device__ __forceinline__ void store(__half& dst, double x) { dst = __double2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16& dst, float x) { dst = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16& dst, double x) { dst = __double2bfloat16(x); }

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
auto dispatch_float(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::f16: return f(Tag<__half>{});
    case FloatKind::bf16: return f(Tag<__nv_bfloat16>{});
    case FloatKind::f64: return f(Tag<double>{});
    default: return f(Tag<float>{});
  }
}

// Calls f(Tag<A>{}, Tag<B>{}) for the C++ types of two FloatKinds (all 16 pairs instantiated).
template <typename F>
auto dispatch_float_pair(FloatKind a, FloatKind b, F&& f) {
  return dispatch_float(a, [&](auto tag_a) { return dispatch_float(b, [&](auto tag_b) { return f(tag_a, tag_b); }); });
}

}  // namespace vlfast
