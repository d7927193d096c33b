// Bit-shuffle of a block of fixed-width elements: output bit-plane k holds bit k of every element
// (planes ordered byte by byte, low bit first). Floats' sign/exponent planes become long runs that
// LZ4 can find. Only the first n - n % 8 elements are shuffled; the tail is copied as is.
#pragma once
#include <cstddef>
#include <cstdint>

namespace forge_paging {

// src and dst hold n elements of `width` bytes; tmp is scratch of the same size. No aliasing.
void bitshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd = true);
void bitunshuffle(const uint8_t* src, uint8_t* dst, uint8_t* tmp, size_t n, size_t width, bool simd = true);

}  // namespace forge_paging
