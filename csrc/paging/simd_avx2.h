// The paging codec's AVX2 kernels (simd_avx2.cpp, the only paging file compiled for AVX2): call them
// only when forge_cpu::avx2(). Byte transposes return the elements done and bit transposes the
// 8-byte groups done; the caller's scalar loop does the rest.
#pragma once
#include <cstddef>
#include <cstdint>

namespace forge_paging {
namespace avx2 {

size_t byte_transpose4(const uint8_t* src, uint8_t* const* p, size_t n);
size_t byte_untranspose4(const uint8_t* const* p, uint8_t* dst, size_t n);
size_t byte_transpose2(const uint8_t* src, uint8_t* const* p, size_t n);
size_t byte_untranspose2(const uint8_t* const* p, uint8_t* dst, size_t n);
size_t bits_forward(const uint8_t* plane, uint8_t* out, size_t n);
size_t bits_inverse(const uint8_t* in, uint8_t* plane, size_t n);
// fp32_low16_zero (codec.h) over whole 128-byte blocks: false as soon as one element has low bits set;
// *done gets the elements checked.
bool low16_zero_blocks(const uint32_t* x, uint64_t n, uint64_t* done);

}  // namespace avx2
}  // namespace forge_paging
