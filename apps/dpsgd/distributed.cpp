// apps/dpsgd/distributed.cpp: see distributed.h.
#include "distributed.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#ifdef TORCHFUNC_DPSGD_DISTRIBUTED
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

namespace dpsgd {

#ifdef TORCHFUNC_DPSGD_DISTRIBUTED
struct World::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
};

World::World(const WorldOptions& o) : options_(o), impl_(std::make_unique<Impl>()) {
  TORCH_CHECK(o.world_size >= 1 && o.rank >= 0 && o.rank < o.world_size, "distributed: rank ", o.rank,
              " is not in [0, world size ", o.world_size, ")");
  const auto timeout = std::chrono::milliseconds(int64_t(o.timeout_s * 1000));
  c10d::TCPStoreOptions so;
  so.port = uint16_t(o.master_port);
  so.isServer = o.rank == 0;
  so.numWorkers = size_t(o.world_size);
  so.waitWorkers = true;
  so.timeout = timeout;
  try {
    impl_->store = c10::make_intrusive<c10d::TCPStore>(o.master_addr, so);
    auto go = c10d::ProcessGroupGloo::Options::create(timeout);
    // On one machine the loopback device; across machines the address this
    // host's name resolves to (as torch.distributed without GLOO_SOCKET_IFNAME).
    const bool local = o.master_addr == "127.0.0.1" || o.master_addr == "localhost";
    go->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                : c10d::ProcessGroupGloo::createDefaultDevice());
    impl_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, o.rank, o.world_size, go);
  } catch (const std::exception& e) {
    const auto* c10e = dynamic_cast<const c10::Error*>(&e);
    TORCH_CHECK(false, "distributed: rank ", o.rank, " of ", o.world_size, " could not join the group at ",
                o.master_addr, ":", o.master_port, " within ", o.timeout_s, " s: ",
                c10e ? c10e->what_without_backtrace() : e.what());
  }
}

World::~World() = default;

void World::all_reduce_sum(std::vector<at::Tensor>& tensors) {
  if (options_.world_size == 1 || tensors.empty()) return;
  std::vector<at::Tensor> flat;
  for (const auto& t : tensors) flat.push_back(t.reshape(-1));
  std::vector<at::Tensor> buffer{at::cat(flat)};
  auto fail = [&](const char* why) {
    TORCH_CHECK(false, "distributed: rank ", options_.rank, ": the all-reduce of the clipped gradient sums failed "
                "(a peer died or did not answer within ", options_.timeout_s, " s): ", why);
  };
  try {
    impl_->group->allreduce(buffer)->wait();
  } catch (const c10::Error& e) {  // gloo's errors arrive as c10::DistBackendError
    fail(e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail(e.what());
  }
  int64_t offset = 0;
  for (auto& t : tensors) {
    t.copy_(buffer[0].narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}
#else
struct World::Impl {};
World::World(const WorldOptions& o) : options_(o) {
  TORCH_CHECK(o.world_size == 1, "distributed: this torchfunc-dpsgd was built without gloo's headers "
              "(Debian: libgloo-dev), so it runs one process only");
}
World::~World() = default;
void World::all_reduce_sum(std::vector<at::Tensor>&) {}
#endif

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  TORCH_CHECK(fd >= 0, "distributed: socket() failed: ", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  TORCH_CHECK(ok, "distributed: could not find a free port: ", std::strerror(errno));
  return ntohs(addr.sin_port);
}

int launch_local(const std::vector<std::string>& argv, int nproc, int port, double grace_s) {
  std::vector<pid_t> pids;
  for (int r = 0; r < nproc; ++r) {
    std::vector<std::string> args = argv;
    for (const std::string& a : {std::string("--rank"), std::to_string(r), std::string("--world-size"),
                                 std::to_string(nproc), std::string("--master-port"), std::to_string(port)})
      args.push_back(a);
    pid_t pid = ::fork();
    TORCH_CHECK(pid >= 0, "distributed: fork failed: ", std::strerror(errno));
    if (pid == 0) {
      std::vector<char*> c;
      for (auto& a : args) c.push_back(a.data());
      c.push_back(nullptr);
      ::execv("/proc/self/exe", c.data());
      std::fprintf(stderr, "torchfunc-dpsgd: exec failed: %s\n", std::strerror(errno));
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<int> status(nproc, -1);
  int running = nproc, failed = 0;
  auto first_failure = std::chrono::steady_clock::time_point::max();
  bool killed = false;
  while (running > 0) {
    int st = 0;
    pid_t pid = ::waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < nproc; ++r)
        if (pids[r] == pid) {
          status[r] = st;
          --running;
          if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            ++failed;
            if (first_failure == std::chrono::steady_clock::time_point::max())
              first_failure = std::chrono::steady_clock::now();
          }
        }
      continue;
    }
    if (!killed && failed > 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - first_failure).count() > grace_s) {
      for (int r = 0; r < nproc; ++r)
        if (status[r] == -1) ::kill(pids[r], SIGKILL);
      killed = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (failed == 0) return 0;
  for (int r = 0; r < nproc; ++r) {
    const int st = status[r];
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) continue;
    if (WIFEXITED(st))
      std::fprintf(stderr, "torchfunc-dpsgd: rank %d exited with status %d\n", r, WEXITSTATUS(st));
    else
      std::fprintf(stderr, "torchfunc-dpsgd: rank %d was killed by signal %d%s\n", r, WTERMSIG(st),
                   killed && WTERMSIG(st) == SIGKILL ? " (it had not stopped after another rank failed)" : "");
  }
  return 1;
}

}  // namespace dpsgd
