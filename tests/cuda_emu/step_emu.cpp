// CPU run of backends/cuda/step.cu (see cuda_emu.h): reads a job file written by tests/test_gpu_step_emu.py,
//   int32 bits, nlayers, dim, heads, kvh, max_ctx, vocab, blocks, ntok, tokens[ntok],
//   int64 offsets of: layer table, head Lin, nf, emb, x, qkv, act, logits, bar, token, pos; int64 blob size; blob
// (pointer fields of the Lin/Layer tables hold offsets into the blob), runs ntok decode steps and writes
// the last logits (float32[vocab]) to the output file.
#include "cuda_emu.h"
#include "step.cu"

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <thread>
#include <vector>

template <class T> static void reloc(T*& p, char* base) { p = reinterpret_cast<T*>(base + reinterpret_cast<uintptr_t>(p)); }
static void reloc_lin(Lin& l, char* base) {
  reloc(l.A, base); reloc(l.H, base); reloc(l.S, base); reloc(l.Z, base);
}

int main(int argc, char** argv) {
  if (argc != 3) { std::fprintf(stderr, "usage: step_emu JOB OUT\n"); return 2; }
  FILE* f = std::fopen(argv[1], "rb");
  int32_t hdr[9];
  if (!f || std::fread(hdr, 4, 9, f) != 9) return 3;
  const int bits = hdr[0], nlayers = hdr[1], dim = hdr[2], heads = hdr[3], kvh = hdr[4], max_ctx = hdr[5],
            vocab = hdr[6], blocks = hdr[7], ntok = hdr[8];
  std::vector<int32_t> tokens(ntok);
  int64_t off[11], size;
  if (std::fread(tokens.data(), 4, ntok, f) != (size_t)ntok || std::fread(off, 8, 11, f) != 11 ||
      std::fread(&size, 8, 1, f) != 1) return 3;
  char* base = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED || std::fread(base, 1, size, f) != (size_t)size) return 4;
  std::fclose(f);
  Layer* layers = reinterpret_cast<Layer*>(base + off[0]);
  for (int l = 0; l < nlayers; ++l) {
    reloc_lin(layers[l].qkv, base); reloc_lin(layers[l].o, base); reloc_lin(layers[l].gu, base); reloc_lin(layers[l].down, base);
    reloc(layers[l].n1, base); reloc(layers[l].n2, base); reloc(layers[l].kc, base); reloc(layers[l].vc, base);
  }
  Lin* head = reinterpret_cast<Lin*>(base + off[1]);
  reloc_lin(*head, base);
  auto at = [&](int i) { return base + off[i]; };
  int* token = reinterpret_cast<int*>(at(9));
  int* pos = reinterpret_cast<int*>(at(10));
  unsigned* bar = reinterpret_cast<unsigned*>(at(8));
  for (int t = 0; t < ntok; ++t) {
    *token = tokens[t];
    *pos = t;
    bar[0] = 0;
    std::vector<pid_t> kids;
    for (int b = 0; b < blocks; ++b) {
      const pid_t pid = fork();
      if (pid == 0) {
        blockIdx.x = b;
        gridDim.x = blocks;
        blockDim.x = STEP_THREADS;
        emu_block_bar = new std::barrier<>(STEP_THREADS);
        for (int w = 0; w < STEP_WARPS; ++w) emu_warp_bar[w] = new std::barrier<>(32);
        std::vector<std::thread> th;
        for (int i = 0; i < STEP_THREADS; ++i)
          th.emplace_back([&, i] {
            threadIdx.x = i;
            auto* x = reinterpret_cast<float*>(at(4));
            auto* qkv = reinterpret_cast<float*>(at(5));
            auto* act = reinterpret_cast<float*>(at(6));
            auto* logits = reinterpret_cast<float*>(at(7));
            const auto* nf = reinterpret_cast<const float*>(at(2));
            const auto* emb = reinterpret_cast<const __half*>(at(3));
            if (bits == 4) decode_step<4>(layers, head, nf, emb, token, pos, x, qkv, act, logits, bar, nlayers, dim, heads, kvh, max_ctx, 1e-5f, 10000.f, 1);
            if (bits == 3) decode_step<3>(layers, head, nf, emb, token, pos, x, qkv, act, logits, bar, nlayers, dim, heads, kvh, max_ctx, 1e-5f, 10000.f, 1);
            if (bits == 2) decode_step<2>(layers, head, nf, emb, token, pos, x, qkv, act, logits, bar, nlayers, dim, heads, kvh, max_ctx, 1e-5f, 10000.f, 1);
          });
        for (auto& x : th) x.join();
        _exit(0);
      }
      kids.push_back(pid);
    }
    for (pid_t k : kids) {
      int st = 0;
      waitpid(k, &st, 0);
      if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { std::fprintf(stderr, "block process failed\n"); return 5; }
    }
    if (bar[1] != 0) { std::fprintf(stderr, "grid barrier timed out\n"); return 6; }
  }
  FILE* o = std::fopen(argv[2], "wb");
  std::fwrite(at(7), 4, vocab, o);
  std::fclose(o);
  return 0;
}
