// Reader for the IDX files of MNIST and Fashion-MNIST (gzipped or plain).
// Pure C++ + zlib, no torch, so that its error paths are cheap to test.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dpsgd {

struct IdxImages {
  int64_t count = 0, rows = 0, cols = 0;
  std::vector<uint8_t> pixels;  // count * rows * cols, row-major
};

// Each throws std::runtime_error naming the file when it is missing or
// unreadable, is not a valid gzip stream, has the wrong magic number, or holds
// fewer (or more) bytes than its header announces.
IdxImages read_idx_images(const std::string& path);
std::vector<uint8_t> read_idx_labels(const std::string& path);

struct ImageSet {
  IdxImages images;
  std::vector<uint8_t> labels;  // values in [0, 10)
};

// Loads `<dir>/<split>-images-idx3-ubyte.gz` and `<dir>/<split>-labels-idx1-ubyte.gz`
// (split "train" or "t10k"; an uncompressed file without ".gz" is accepted too)
// and checks that they agree in count and that the labels are classes 0..9.
ImageSet load_split(const std::string& dir, const std::string& split);

}  // namespace dpsgd
