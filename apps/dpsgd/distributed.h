// Data-parallel DP-SGD over torch.distributed's C++ layer (c10d): a TCPStore
// for the rendezvous (rank 0 serves it) and a ProcessGroupGloo for the
// all-reduce of the clipped gradient sums. The c10d and gloo headers stay in
// distributed.cpp; built when gloo's headers are found (Debian: libgloo-dev),
// TORCHFUNC_DPSGD_DISTRIBUTED says whether it was.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace dpsgd {

struct WorldOptions {
  int rank = 0;
  int world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29517;
  double timeout_s = 60;  // rendezvous and every collective: a dead peer is an error after this long
};

/// This process's place in a run of world_size processes.
class World {
 public:
  explicit World(const WorldOptions& options);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;
  int rank() const { return options_.rank; }
  int size() const { return options_.world_size; }
  /// Sums each tensor over all processes, in place: one flat buffer, one
  /// all-reduce. A failed or timed-out peer raises, naming the rank.
  void all_reduce_sum(std::vector<at::Tensor>& tensors);

 private:
  struct Impl;
  WorldOptions options_;
  std::unique_ptr<Impl> impl_;
};

/// A free TCP port on this machine (bound and released).
int free_port();

/// Runs `argv` (this program, path first) nproc times as ranks 0..nproc-1 on
/// this machine, appending --rank r --world-size nproc --master-port port,
/// and waits for all. When one fails, the others get `grace_s` seconds to
/// notice (their collectives fail) and are then killed. Returns 0 when every
/// rank succeeded, else 1 after printing which ranks failed and how.
int launch_local(const std::vector<std::string>& argv, int nproc, int port, double grace_s);

}  // namespace dpsgd
