// Row-wise ops whose result must not depend on how many rows a step holds: XLA FFI handlers for the CPU
// path of jaxinfer.layers.norm (RMSNorm) and jaxinfer.layers.rotary (rotary embedding).
//
// XLA's CPU code for a reduction or a transcendental changes with the array's shape (how it tiles rows,
// which elements fall in a vector tail), so the same token gave slightly different bits in a step of 1
// row and in a step of 8; the int8 rounding of the next matmul's activations then amplifies the
// difference into different tokens. Here every row is computed by the same code whatever the batch,
// so a decode row, a verification node and a row of a larger batch agree bit for bit.
//
// Targets:
//   jaxinfer_rms_norm(x [..., E] f32, weight [E] f32) -> [..., E] f32; attribute eps (f32).
//       y = x / sqrt(mean(x^2) + eps) * weight, the mean summed in 16 interleaved partial sums
//       combined in a fixed order.
//   jaxinfer_rotary(x [..., T, N, D] f32, positions [..., T] i32) -> [..., T, N, D] f32; attribute
//       inv_freq (f32 array [D/2]). Rotate-half rotary embedding: angle = float(position) * inv_freq[i]
//       (f32), cos/sin from libm. Positions may omit leading axes of x (they repeat over them).
// Leading axes are rows: the ops also serve vmapped callers (the draft head's batched steps).
// Built with -ffp-contract=off (see build.py): no FMA contraction either.

#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxinfer_rows {

constexpr int kLanes = 16;

ffi::Error RmsNormImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> out,
                       float eps) {
  auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() < 1 || weight.element_count() != size_t(xd.back())) {
    return ffi::Error::InvalidArgument("rms norm: expected x [..., E] and weight [E]");
  }
  const int64_t width = xd.back(), rows = int64_t(x.element_count()) / width;
  const float* w = weight.typed_data();
  for (int64_t t = 0; t < rows; ++t) {
    const float* a = x.typed_data() + t * width;
    float* y = out->typed_data() + t * width;
    float partial[kLanes] = {};
    int64_t e = 0;
    for (; e + kLanes <= width; e += kLanes) {
      for (int j = 0; j < kLanes; ++j) partial[j] += a[e + j] * a[e + j];
    }
    for (int j = 0; e < width; ++e, ++j) partial[j] += a[e] * a[e];
    for (int step = kLanes / 2; step > 0; step /= 2) {
      for (int j = 0; j < step; ++j) partial[j] += partial[j + step];
    }
    const float scale = 1.0f / std::sqrt(partial[0] / float(width) + eps);
    for (e = 0; e < width; ++e) y[e] = a[e] * scale * w[e];
  }
  return ffi::Error::Success();
}

ffi::Error RotaryImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                      ffi::Span<const float> inv_freq) {
  auto xd = x.dimensions();
  const int64_t count = int64_t(positions.element_count());
  if (xd.size() < 3 || xd.back() % 2 || int64_t(inv_freq.size()) != xd.back() / 2 || count < 1 ||
      (int64_t(x.element_count()) / (xd[xd.size() - 2] * xd.back())) % count) {
    return ffi::Error::InvalidArgument("rotary: expected x [..., T, N, D] (D even), positions [..., T], inv_freq [D/2]");
  }
  const int64_t heads = xd[xd.size() - 2], dim = xd.back(), half = dim / 2;
  const int64_t rows = int64_t(x.element_count()) / (heads * dim);
  std::vector<float> cos_t(half), sin_t(half);
  for (int64_t t = 0; t < rows; ++t) {
    const float position = float(positions.typed_data()[t % count]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = position * inv_freq[i];
      cos_t[i] = std::cos(angle);
      sin_t[i] = std::sin(angle);
    }
    for (int64_t h = 0; h < heads; ++h) {
      const float* a = x.typed_data() + (t * heads + h) * dim;
      float* y = out->typed_data() + (t * heads + h) * dim;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = a[i], x2 = a[half + i];
        y[i] = x1 * cos_t[i] - x2 * sin_t[i];
        y[half + i] = x2 * cos_t[i] + x1 * sin_t[i];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace jaxinfer_rows

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_rms_norm, jaxinfer_rows::RmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight [E]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, E]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_rotary, jaxinfer_rows::RotaryImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, N, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [T]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, N, D]
                                  .Attr<ffi::Span<const float>>("inv_freq"));
