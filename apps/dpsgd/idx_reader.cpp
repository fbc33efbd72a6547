#include "idx_reader.h"

#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <sys/stat.h>

namespace dpsgd {
namespace {

constexpr uint32_t kLabelsMagic = 0x00000801;  // unsigned byte, 1 dimension
constexpr uint32_t kImagesMagic = 0x00000803;  // unsigned byte, 3 dimensions

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("fashion-mnist: " + path + ": " + what);
}

// A gzip stream (zlib reads uncompressed files through the same calls).
class GzFile {
 public:
  explicit GzFile(const std::string& path) : path_(path) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) fail(path, "file not found");
    file_ = gzopen(path.c_str(), "rb");
    if (!file_) fail(path, "cannot open");
  }
  ~GzFile() { gzclose(file_); }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  // Reads exactly n bytes, or fails saying what was expected.
  void read(void* dst, size_t n, const char* what) {
    size_t got = 0;
    while (got < n) {
      unsigned chunk = unsigned(std::min<size_t>(n - got, 1u << 30));
      int r = gzread(file_, static_cast<char*>(dst) + got, chunk);
      if (r < 0) {
        int err = 0;
        const char* msg = gzerror(file_, &err);
        fail(path_, std::string("corrupt gzip data (") + msg + ")");
      }
      if (r == 0) break;
      got += size_t(r);
    }
    if (got < n)
      fail(path_, "truncated: expected " + std::to_string(n) + " bytes of " + what + ", found " + std::to_string(got));
  }

  uint32_t read_be32(const char* what) {
    unsigned char b[4];
    read(b, 4, what);
    return (uint32_t(b[0]) << 24) | (uint32_t(b[1]) << 16) | (uint32_t(b[2]) << 8) | uint32_t(b[3]);
  }

  void expect_end() {
    char c;
    int r = gzread(file_, &c, 1);
    if (r > 0) fail(path_, "trailing data after the announced number of items");
    if (r < 0) fail(path_, "corrupt gzip data at the end of the file");
  }

  void expect_magic(uint32_t want, const char* kind) {
    uint32_t magic = read_be32("header");
    if (magic != want) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "wrong magic number 0x%08x (an IDX %s file starts with 0x%08x)", magic, kind, want);
      fail(path_, buf);
    }
  }

 private:
  std::string path_;
  gzFile file_ = nullptr;
};

}  // namespace

IdxImages read_idx_images(const std::string& path) {
  GzFile f(path);
  f.expect_magic(kImagesMagic, "images");
  IdxImages out;
  out.count = f.read_be32("header");
  out.rows = f.read_be32("header");
  out.cols = f.read_be32("header");
  if (out.rows == 0 || out.cols == 0 || out.rows > 4096 || out.cols > 4096)
    fail(path, "implausible image size " + std::to_string(out.rows) + "x" + std::to_string(out.cols));
  out.pixels.resize(size_t(out.count * out.rows * out.cols));
  f.read(out.pixels.data(), out.pixels.size(), "pixels");
  f.expect_end();
  return out;
}

std::vector<uint8_t> read_idx_labels(const std::string& path) {
  GzFile f(path);
  f.expect_magic(kLabelsMagic, "labels");
  std::vector<uint8_t> labels(f.read_be32("header"));
  f.read(labels.data(), labels.size(), "labels");
  f.expect_end();
  return labels;
}

ImageSet load_split(const std::string& dir, const std::string& split) {
  auto pick = [&](const std::string& stem) {
    std::string gz = dir + "/" + stem + ".gz";
    struct stat st;
    if (::stat(gz.c_str(), &st) == 0) return gz;
    std::string plain = dir + "/" + stem;
    if (::stat(plain.c_str(), &st) == 0) return plain;
    return gz;  // reported as missing
  };
  std::string images_path = pick(split + "-images-idx3-ubyte");
  std::string labels_path = pick(split + "-labels-idx1-ubyte");
  ImageSet set{read_idx_images(images_path), read_idx_labels(labels_path)};
  if (int64_t(set.labels.size()) != set.images.count)
    fail(labels_path, "holds " + std::to_string(set.labels.size()) + " labels but " + images_path + " holds " +
                          std::to_string(set.images.count) + " images");
  for (size_t i = 0; i < set.labels.size(); ++i)
    if (set.labels[i] > 9) fail(labels_path, "label " + std::to_string(set.labels[i]) + " at index " + std::to_string(i) + " is not a class 0..9");
  return set;
}

}  // namespace dpsgd
