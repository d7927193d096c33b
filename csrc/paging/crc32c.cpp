#include "paging/crc32c.h"

#include <array>
#include <cstring>

#include "cpu_path.h"
#if defined(__x86_64__)
#include <nmmintrin.h>
#define FORGE_CRC_HW "sse4.2"
#define FORGE_CRC_TARGET __attribute__((target("sse4.2")))  // chosen at run time (cpu_path.h)
#elif defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
#define FORGE_CRC_HW "armv8"
#define FORGE_CRC_TARGET
#endif

namespace forge_paging {
namespace {

const std::array<uint32_t, 256>& table() {
  static const std::array<uint32_t, 256> t = [] {
    std::array<uint32_t, 256> a{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int b = 0; b < 8; ++b) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
      a[i] = c;
    }
    return a;
  }();
  return t;
}

#ifdef FORGE_CRC_HW
FORGE_CRC_TARGET uint32_t crc32c_hw(const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = ~crc;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
#if defined(__x86_64__)
    c = _mm_crc32_u64(c, v);
#else
    c = __crc32cd(uint32_t(c), v);
#endif
  }
  for (; i < n; ++i) {
#if defined(__x86_64__)
    c = _mm_crc32_u8(uint32_t(c), p[i]);
#else
    c = __crc32cb(uint32_t(c), p[i]);
#endif
  }
  return ~uint32_t(c);
}
#endif

}  // namespace

uint32_t crc32c(const uint8_t* p, size_t n, uint32_t crc) {
#ifdef FORGE_CRC_HW
  if (forge_cpu::crc_instructions()) return crc32c_hw(p, n, crc);
#endif
  return crc32c_table(p, n, crc);
}

uint32_t crc32c_table(const uint8_t* p, size_t n, uint32_t crc) {
  const auto& t = table();
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return ~c;
}

const char* crc32c_path() {
#ifdef FORGE_CRC_HW
  if (forge_cpu::crc_instructions()) return FORGE_CRC_HW;
#endif
  return "table";
}

}  // namespace forge_paging
