// cpu_scan.cpp behind stdin and stdout, for tests/test_cpu_scan_arm.py: the calls that
// selective_scan/cpu.py makes through ctypes, made by a program, so that a build for another
// architecture can run under user-mode emulation (qemu-aarch64) on the tensors of this machine.
//
// `driver constants` prints the build's lanes and tile. `driver` reads one call from stdin, all
// little-endian int64 but the data: the kernel (0 forward, 1 backward), the bytes per value (4
// float, 8 double), ScanProblem's integer fields in order, then for each pointer field in order
// its size in bytes (-1 for a null pointer) and its bytes; it runs the kernel and writes the
// buffers back to stdout in the same order, without sizes.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_scan.cpp"

namespace {

constexpr int kIntegers = 7;  // batch, dim, length, state, groups, softplus, threads
constexpr int kPointers = (sizeof(ScanProblem) - kIntegers * sizeof(int64_t)) / sizeof(void*);
static_assert(sizeof(ScanProblem) == kIntegers * sizeof(int64_t) + kPointers * sizeof(void*),
              "ScanProblem is integers, then pointers");

void read_exactly(void* to, size_t bytes) {
  if (fread(to, 1, bytes, stdin) != bytes) {
    fprintf(stderr, "driver: stdin ended early\n");
    exit(1);
  }
}

int64_t read_int() {
  int64_t value;
  read_exactly(&value, sizeof(value));
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "constants") == 0) {
    printf("%lld %lld\n", (long long)selective_scan_lanes(), (long long)selective_scan_tile());
    return 0;
  }
  const int64_t backward = read_int(), value_bytes = read_int();
  int64_t integers[kIntegers];
  for (int64_t& value : integers) value = read_int();
  void* pointers[kPointers];
  int64_t sizes[kPointers];
  for (int i = 0; i < kPointers; ++i) {
    sizes[i] = read_int();
    pointers[i] = sizes[i] < 0 ? nullptr : malloc(sizes[i] > 0 ? sizes[i] : 1);
    if (pointers[i]) read_exactly(pointers[i], sizes[i]);
  }
  ScanProblem problem;
  memcpy(&problem, integers, sizeof(integers));
  memcpy(reinterpret_cast<char*>(&problem) + sizeof(integers), pointers, sizeof(pointers));
  if (value_bytes == 4)
    (backward ? selective_scan_bwd_float : selective_scan_fwd_float)(&problem);
  else
    (backward ? selective_scan_bwd_double : selective_scan_fwd_double)(&problem);
  for (int i = 0; i < kPointers; ++i)
    if (pointers[i]) fwrite(pointers[i], 1, sizes[i], stdout);
  return 0;
}
