// Bit-shuffle of a block of fixed-width elements in two stages, each with its inverse:
//   byte transpose: n elements of `width` bytes -> `width` byte planes of n bytes (plane b = byte b
//                   of every element), written through one pointer per plane so callers can place
//                   planes apart (the codec sends only the compressible ones to LZ4);
//   bit transpose:  one byte plane of n bytes (n % 8 == 0) -> its 8 bit planes of n/8 bytes each.
// Floats' sign/exponent planes become long runs that LZ4 can find.
#pragma once
#include <cstddef>
#include <cstdint>

namespace forge_paging {

constexpr size_t kMaxWidth = 16;  // widest torch element (complex128)

void byte_transpose(const uint8_t* src, uint8_t* const* planes, size_t n, size_t width, bool simd = true);
void byte_untranspose(const uint8_t* const* planes, uint8_t* dst, size_t n, size_t width, bool simd = true);
void bit_transpose(const uint8_t* plane, uint8_t* out, size_t n, bool simd = true);
void bit_untranspose(const uint8_t* in, uint8_t* plane, size_t n, bool simd = true);

// Both stages over all planes: only the first n - n % 8 elements are shuffled, the tail is copied
// as is after them. src and dst hold n elements; tmp is scratch of the same size. No aliasing.
void bitshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd = true);
void bitunshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd = true);

}  // namespace forge_paging
