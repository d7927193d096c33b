#include "paging/bitshuffle.h"

#include <cstring>

#include "cpu_path.h"
#ifdef FORGE_RT_X86_DISPATCH
#include "paging/simd_avx2.h"
#endif

namespace forge_paging {
namespace {

// Elements [i0, n): forward moves byte b of element i to planes[b][i], Inverse moves it back.
// W is a compile-time width for the common sizes so the compiler unrolls the inner loop.
template <size_t W, bool Inverse>
void transpose_w(uint8_t* flat, uint8_t* const* planes, size_t i0, size_t n, size_t width) {
  const size_t w = W ? W : width;
  for (size_t i = i0; i < n; ++i)
    for (size_t b = 0; b < w; ++b) {
      if (Inverse) flat[i * w + b] = planes[b][i];
      else planes[b][i] = flat[i * w + b];
    }
}


// 8x8 bit matrix transpose of a little-endian uint64 (row r = byte r, column c = bit c).
inline uint64_t transpose8(uint64_t x) {
  uint64_t t;
  t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull; x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull; x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull; x ^= t ^ (t << 28);
  return x;
}

// plane (n bytes, n % 8 == 0) -> 8 bit planes of n/8 bytes each, starting at groups g0..n/8.
void bits_forward_scalar(const uint8_t* plane, uint8_t* out, size_t n, size_t g0) {
  const size_t ng = n / 8;
  for (size_t g = g0; g < ng; ++g) {
    uint64_t x;
    std::memcpy(&x, plane + 8 * g, 8);
    x = transpose8(x);
    for (int j = 0; j < 8; ++j) out[j * ng + g] = uint8_t(x >> (8 * j));
  }
}

void bits_inverse_scalar(const uint8_t* in, uint8_t* plane, size_t n, size_t g0) {
  const size_t ng = n / 8;
  for (size_t g = g0; g < ng; ++g) {
    uint64_t x = 0;
    for (int j = 0; j < 8; ++j) x |= uint64_t(in[j * ng + g]) << (8 * j);
    x = transpose8(x);
    std::memcpy(plane + 8 * g, &x, 8);
  }
}


}  // namespace

namespace {

// Both directions share one dispatch: AVX2 for widths 2 and 4, then the scalar loop for the rest.
template <bool Inverse>
void transpose(uint8_t* flat, uint8_t* const* planes, size_t n, size_t width, bool simd) {
  size_t i0 = 0;
  (void)simd;
  switch (width) {
    case 1:
      if (Inverse) std::memcpy(flat, planes[0], n);
      else std::memcpy(planes[0], flat, n);
      return;
    case 2:
#ifdef FORGE_RT_X86_DISPATCH
      if (simd && forge_cpu::avx2())
        i0 = Inverse ? avx2::byte_untranspose2(planes, flat, n) : avx2::byte_transpose2(flat, planes, n);
#endif
      return transpose_w<2, Inverse>(flat, planes, i0, n, width);
    case 4:
#ifdef FORGE_RT_X86_DISPATCH
      if (simd && forge_cpu::avx2())
        i0 = Inverse ? avx2::byte_untranspose4(planes, flat, n) : avx2::byte_transpose4(flat, planes, n);
#endif
      return transpose_w<4, Inverse>(flat, planes, i0, n, width);
    case 8: return transpose_w<8, Inverse>(flat, planes, 0, n, width);
    default: return transpose_w<0, Inverse>(flat, planes, 0, n, width);
  }
}

}  // namespace

// The shared dispatch writes through both pointer kinds; each public direction only writes its output.
void byte_transpose(const uint8_t* src, uint8_t* const* planes, size_t n, size_t width, bool simd) {
  transpose<false>(const_cast<uint8_t*>(src), planes, n, width, simd);
}

void byte_untranspose(const uint8_t* const* planes, uint8_t* dst, size_t n, size_t width, bool simd) {
  transpose<true>(dst, const_cast<uint8_t* const*>(planes), n, width, simd);
}

namespace {

template <bool Inverse>
void bits(const uint8_t* in, uint8_t* out, size_t n, bool simd) {
  size_t g0 = 0;
#ifdef FORGE_RT_X86_DISPATCH
  if (simd && forge_cpu::avx2()) g0 = Inverse ? avx2::bits_inverse(in, out, n) : avx2::bits_forward(in, out, n);
#endif
  (void)simd;
  if (Inverse) bits_inverse_scalar(in, out, n, g0);
  else bits_forward_scalar(in, out, n, g0);
}

}  // namespace

void bit_transpose(const uint8_t* plane, uint8_t* out, size_t n, bool simd) { bits<false>(plane, out, n, simd); }

void bit_untranspose(const uint8_t* in, uint8_t* plane, size_t n, bool simd) { bits<true>(in, plane, n, simd); }

void bitshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd) {
  const size_t n8 = n - n % 8;
  uint8_t* planes[kMaxWidth] = {};
  for (size_t b = 0; b < width; ++b) planes[b] = tmp + b * n8;
  byte_transpose(src, planes, n8, width, simd);
  for (size_t b = 0; b < width; ++b) bit_transpose(planes[b], dst + b * n8, n8, simd);
  std::memcpy(dst + n8 * width, src + n8 * width, (n - n8) * width);
}

void bitunshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd) {
  const size_t n8 = n - n % 8;
  const uint8_t* planes[kMaxWidth] = {};
  for (size_t b = 0; b < width; ++b) {
    bit_untranspose(src + b * n8, tmp + b * n8, n8, simd);
    planes[b] = tmp + b * n8;
  }
  byte_untranspose(planes, dst, n8, width, simd);
  std::memcpy(dst + n8 * width, src + n8 * width, (n - n8) * width);
}

}  // namespace forge_paging
