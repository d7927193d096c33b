// CRC-32C of a byte range on the CPU: the SSE4.2 or ARMv8 CRC instructions where the CPU has them
// (about 10 GB/s a core here, against 6 for zlib's crc32), else a byte table.
#pragma once
#include <cstddef>
#include <cstdint>

namespace forge_paging {

uint32_t crc32c(const uint8_t* p, size_t n, uint32_t crc = 0);
// The byte-table version crc32c() falls back to where the CPU has no CRC instructions.
uint32_t crc32c_table(const uint8_t* p, size_t n, uint32_t crc = 0);
// Which one crc32c() runs: "sse4.2", "armv8" or "table".
const char* crc32c_path();

}  // namespace forge_paging
