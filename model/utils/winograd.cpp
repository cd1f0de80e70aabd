// Winograd F(2x2, 3x3) tile transforms for 3x3 convolutions (stride 1, padding 1) on the CPU.
// Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016.
//
// An output tile of 2x2 pixels comes from a 4x4 input tile d (the tiles overlap by 2 pixels):
//   Y = A^T [ (G g G^T) . (B^T d B) ] A       (. : elementwise over the 4x4 positions, summed over channels)
// with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],   A^T = [1 1 1 0; 0 1 -1 -1],
//   G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1].
// The sum over input channels is, for each of the 16 positions xi, one matrix product
//   M[xi] (tiles x K) = V[xi] (tiles x C) @ U[xi] (C x K),
// which model/utils/cpu_conv.py runs as a batched GEMM (torch.bmm, or oneDNN's matmul: onednn_gemm below)
// between the two transforms here. The weight
// gradient runs the same algebra backwards: dU[xi] (C x K) = V[xi]^T @ dM[xi], dM = A dY A^T per tile (the
// adjoint of the output transform, output_adjoint below), and dg = G^T dU G.
//
// Layouts (all contiguous):
//   x : (N, H, W, C)    input in NHWC (a channels_last tensor's storage order)
//   V : (16, T, C)      transformed input tiles t0 .. t0+T-1 (tile t = (n, ty, tx), row-major)
//   M : (16, T, K)      the products for the same tiles
//   y : (N, H, W, K)    output in NHWC; bias (K,) or an empty tensor
//   dY: (N, H, W, K)    the gradient w.r.t. y, NHWC; dM: (16, T, K) its adjoint-transformed tiles
// tH = ceil(H / 2), tW = ceil(W / 2) tiles per image; pixels outside the image (the padding of 1 and the
// bottom/right of an odd size) read as 0 and are never written.
//
// The transforms only add and subtract (no multiplication), each tile is written by one thread, and the
// channel loops are plain, so the result is the same for any thread count. Built by build.py.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 64;  // channels per inner block: 16 x 64 values stay in L1

// The channel loops vectorise; on x86 the compiler builds them for AVX-512, AVX2 and the baseline, and the
// loader picks the best the CPU has (the .so runs on any x86-64, its speed follows the CPU).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WINOGRAD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WINOGRAD_CLONES
#endif

// Tiles t0 + begin .. t0 + end - 1 of xp (N, H, W, C) into vp (16, T, C); zeros: C zeros.
template <typename scalar_t>
WINOGRAD_CLONES void input_tiles(const scalar_t* xp, scalar_t* vp, const scalar_t* zeros, int64_t H, int64_t W,
                                 int64_t C, int64_t T, int64_t t0, int64_t begin, int64_t end) {
  const int64_t tH = (H + 1) / 2, tW = (W + 1) / 2;
  {
    scalar_t d[16][kChannelBlock];
    scalar_t r[16][kChannelBlock];
    for (int64_t i_tile = begin; i_tile < end; ++i_tile) {
      const int64_t t = t0 + i_tile;
      const int64_t n = t / (tH * tW), ty = (t / tW) % tH, tx = t % tW;
      const scalar_t* rows[16];  // the 4x4 input pixels, each a run of C channels
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          const int64_t yy = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
          const bool inside = yy >= 0 && yy < H && xx >= 0 && xx < W;
          rows[i * 4 + j] = inside ? xp + ((n * H + yy) * W + xx) * C : zeros;
        }
      }
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t nc = std::min(kChannelBlock, C - c0);
        for (int p = 0; p < 16; ++p) {
          const scalar_t* src = rows[p] + c0;
          for (int64_t c = 0; c < nc; ++c) d[p][c] = src[c];
        }
        for (int j = 0; j < 4; ++j) {  // r = B^T d (over rows)
          for (int64_t c = 0; c < nc; ++c) {
            const scalar_t d0 = d[j][c], d1 = d[4 + j][c], d2 = d[8 + j][c], d3 = d[12 + j][c];
            r[j][c] = d0 - d2;
            r[4 + j][c] = d1 + d2;
            r[8 + j][c] = d2 - d1;
            r[12 + j][c] = d1 - d3;
          }
        }
        for (int i = 0; i < 4; ++i) {  // V = r B (over columns)
          scalar_t* o0 = vp + ((i * 4 + 0) * T + i_tile) * C + c0;
          scalar_t* o1 = vp + ((i * 4 + 1) * T + i_tile) * C + c0;
          scalar_t* o2 = vp + ((i * 4 + 2) * T + i_tile) * C + c0;
          scalar_t* o3 = vp + ((i * 4 + 3) * T + i_tile) * C + c0;
          for (int64_t c = 0; c < nc; ++c) {
            const scalar_t r0 = r[i * 4][c], r1 = r[i * 4 + 1][c], r2 = r[i * 4 + 2][c], r3 = r[i * 4 + 3][c];
            o0[c] = r0 - r2;
            o1[c] = r1 + r2;
            o2[c] = r2 - r1;
            o3[c] = r1 - r3;
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void input_transform_impl(const at::Tensor& x, int64_t t0, at::Tensor& v) {
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t T = v.size(1);
  TORCH_CHECK(t0 >= 0 && t0 + T <= N * ((H + 1) / 2) * ((W + 1) / 2), "winograd input_transform: tiles out of range");
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* vp = v.data_ptr<scalar_t>();
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    input_tiles<scalar_t>(xp, vp, zeros.data(), H, W, C, T, t0, begin, end);
  });
}

// Output pixels of tiles t0 + begin .. t0 + end - 1 from mp (16, T, K) into yp (N, H, W, K); bp: (K,) or null.
template <typename scalar_t>
WINOGRAD_CLONES void output_tiles(const scalar_t* mp, const scalar_t* bp, scalar_t* yp, int64_t H, int64_t W,
                                  int64_t K, int64_t T, int64_t t0, int64_t begin, int64_t end) {
  const int64_t tH = (H + 1) / 2, tW = (W + 1) / 2;
  {
    scalar_t s[8][kChannelBlock];
    for (int64_t i_tile = begin; i_tile < end; ++i_tile) {
      const int64_t t = t0 + i_tile;
      const int64_t n = t / (tH * tW), ty = (t / tW) % tH, tx = t % tW;
      const scalar_t* rows[16];
      for (int p = 0; p < 16; ++p) rows[p] = mp + (p * T + i_tile) * K;
      scalar_t* out[4];  // the 2x2 output pixels; nullptr outside the image
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          const int64_t yy = 2 * ty + i, xx = 2 * tx + j;
          out[i * 2 + j] = (yy < H && xx < W) ? yp + ((n * H + yy) * W + xx) * K : nullptr;
        }
      }
      for (int64_t k0 = 0; k0 < K; k0 += kChannelBlock) {
        const int64_t nk = std::min(kChannelBlock, K - k0);
        for (int j = 0; j < 4; ++j) {  // s = A^T M (over rows)
          const scalar_t* m0 = rows[j] + k0;
          const scalar_t* m1 = rows[4 + j] + k0;
          const scalar_t* m2 = rows[8 + j] + k0;
          const scalar_t* m3 = rows[12 + j] + k0;
          for (int64_t k = 0; k < nk; ++k) {
            s[j][k] = m0[k] + m1[k] + m2[k];
            s[4 + j][k] = m1[k] - m2[k] - m3[k];
          }
        }
        for (int i = 0; i < 2; ++i) {  // Y = s A (over columns), plus the bias
          scalar_t* left = out[i * 2];
          scalar_t* right = out[i * 2 + 1];
          const scalar_t* s0 = s[i * 4];
          const scalar_t* s1 = s[i * 4 + 1];
          const scalar_t* s2 = s[i * 4 + 2];
          const scalar_t* s3 = s[i * 4 + 3];
          if (left != nullptr) {
            for (int64_t k = 0; k < nk; ++k) {
              left[k0 + k] = s0[k] + s1[k] + s2[k] + (bp ? bp[k0 + k] : scalar_t(0));
            }
          }
          if (right != nullptr) {
            for (int64_t k = 0; k < nk; ++k) {
              right[k0 + k] = s1[k] - s2[k] - s3[k] + (bp ? bp[k0 + k] : scalar_t(0));
            }
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void output_transform_impl(const at::Tensor& m, const at::Tensor& bias, int64_t t0, at::Tensor& y) {
  const int64_t H = y.size(1), W = y.size(2), K = y.size(3), T = m.size(1);
  TORCH_CHECK(t0 >= 0 && t0 + T <= y.size(0) * ((H + 1) / 2) * ((W + 1) / 2),
              "winograd output_transform: tiles out of range");
  const scalar_t* mp = m.data_ptr<scalar_t>();
  const scalar_t* bp = bias.numel() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    output_tiles<scalar_t>(mp, bp, yp, H, W, K, T, t0, begin, end);
  });
}

// The adjoint of output_tiles: dM[a][b] = sum_ij A[a][i] A[b][j] dY[i][j] for tiles t0 + begin .. t0 + end - 1,
// dY read from gp (N, H, W, K) (0 outside the image), written to dp (16, T, K). A = [1 0; 1 1; 1 -1; 0 -1].
template <typename scalar_t>
WINOGRAD_CLONES void output_adjoint_tiles(const scalar_t* gp, scalar_t* dp, const scalar_t* zeros, int64_t H,
                                          int64_t W, int64_t K, int64_t T, int64_t t0, int64_t begin,
                                          int64_t end) {
  const int64_t tH = (H + 1) / 2, tW = (W + 1) / 2;
  scalar_t r[8][kChannelBlock];  // r[a][j] = sum_i A[a][i] dY[i][j], a = 0..3, j = 0..1
  for (int64_t i_tile = begin; i_tile < end; ++i_tile) {
    const int64_t t = t0 + i_tile;
    const int64_t n = t / (tH * tW), ty = (t / tW) % tH, tx = t % tW;
    const scalar_t* g[4];  // dY of the 2x2 output pixels; zeros outside the image
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const int64_t yy = 2 * ty + i, xx = 2 * tx + j;
        g[i * 2 + j] = (yy < H && xx < W) ? gp + ((n * H + yy) * W + xx) * K : zeros;
      }
    }
    for (int64_t k0 = 0; k0 < K; k0 += kChannelBlock) {
      const int64_t nk = std::min(kChannelBlock, K - k0);
      for (int j = 0; j < 2; ++j) {
        const scalar_t* g0 = g[j] + k0;
        const scalar_t* g1 = g[2 + j] + k0;
        for (int64_t k = 0; k < nk; ++k) {
          r[0 * 2 + j][k] = g0[k];
          r[1 * 2 + j][k] = g0[k] + g1[k];
          r[2 * 2 + j][k] = g0[k] - g1[k];
          r[3 * 2 + j][k] = -g1[k];
        }
      }
      for (int a = 0; a < 4; ++a) {
        scalar_t* o0 = dp + ((a * 4 + 0) * T + i_tile) * K + k0;
        scalar_t* o1 = dp + ((a * 4 + 1) * T + i_tile) * K + k0;
        scalar_t* o2 = dp + ((a * 4 + 2) * T + i_tile) * K + k0;
        scalar_t* o3 = dp + ((a * 4 + 3) * T + i_tile) * K + k0;
        const scalar_t* r0 = r[a * 2];
        const scalar_t* r1 = r[a * 2 + 1];
        for (int64_t k = 0; k < nk; ++k) {
          o0[k] = r0[k];
          o1[k] = r0[k] + r1[k];
          o2[k] = r0[k] - r1[k];
          o3[k] = -r1[k];
        }
      }
    }
  }
}

template <typename scalar_t>
void output_adjoint_impl(const at::Tensor& grad, int64_t t0, at::Tensor& dm) {
  const int64_t H = grad.size(1), W = grad.size(2), K = grad.size(3), T = dm.size(1);
  TORCH_CHECK(t0 >= 0 && t0 + T <= grad.size(0) * ((H + 1) / 2) * ((W + 1) / 2),
              "winograd output_adjoint: tiles out of range");
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  scalar_t* dp = dm.data_ptr<scalar_t>();
  const std::vector<scalar_t> zeros(K, scalar_t(0));
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    output_adjoint_tiles<scalar_t>(gp, dp, zeros.data(), H, W, K, T, t0, begin, end);
  });
}

void check_common(const at::Tensor& a, const char* name) {
  TORCH_CHECK(a.device().is_cpu(), "winograd: ", name, " must be on the CPU");
  TORCH_CHECK(a.is_contiguous(), "winograd: ", name, " must be contiguous");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "winograd: ", name, " must be float32 or float64");
}

// Writes the transformed tiles t0 .. t0 + v.size(1) - 1 of x (N, H, W, C) into v (16, T, C).
void input_transform(const at::Tensor& x, int64_t t0, at::Tensor v) {
  check_common(x, "x");
  check_common(v, "v");
  TORCH_CHECK(x.dim() == 4 && v.dim() == 3 && v.size(0) == 16 && v.size(2) == x.size(3),
              "winograd input_transform: x must be (N, H, W, C) and v (16, T, C)");
  TORCH_CHECK(x.scalar_type() == v.scalar_type(), "winograd input_transform: dtypes differ");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_input_transform",
                             [&] { input_transform_impl<scalar_t>(x, t0, v); });
}

// Writes the output pixels of tiles t0 .. t0 + m.size(1) - 1 from m (16, T, K) into y (N, H, W, K).
void output_transform(const at::Tensor& m, const at::Tensor& bias, int64_t t0, at::Tensor y) {
  check_common(m, "m");
  check_common(y, "y");
  TORCH_CHECK(m.dim() == 3 && y.dim() == 4 && m.size(0) == 16 && m.size(2) == y.size(3),
              "winograd output_transform: m must be (16, T, K) and y (N, H, W, K)");
  TORCH_CHECK(m.scalar_type() == y.scalar_type(), "winograd output_transform: dtypes differ");
  if (bias.numel()) {
    check_common(bias, "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == y.size(3) && bias.scalar_type() == y.scalar_type(),
                "winograd output_transform: bias must be (K,) of y's dtype");
  }
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "winograd_output_transform",
                             [&] { output_transform_impl<scalar_t>(m, bias, t0, y); });
}

// Writes the adjoint of output_transform for tiles t0 .. t0 + dm.size(1) - 1: dm (16, T, K) from grad
// (N, H, W, K), the gradient w.r.t. y (the weight gradient's products need it).
void output_adjoint(const at::Tensor& grad, int64_t t0, at::Tensor dm) {
  check_common(grad, "grad");
  check_common(dm, "dm");
  TORCH_CHECK(grad.dim() == 4 && dm.dim() == 3 && dm.size(0) == 16 && dm.size(2) == grad.size(3),
              "winograd output_adjoint: grad must be (N, H, W, K) and dm (16, T, K)");
  TORCH_CHECK(grad.scalar_type() == dm.scalar_type(), "winograd output_adjoint: dtypes differ");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "winograd_output_adjoint",
                             [&] { output_adjoint_impl<scalar_t>(grad, t0, dm); });
}

// oneDNN's matmul as PyTorch links it: at::native::mkldnn_matmul(a, b, out, beta, alpha) computes
// out = beta * out + alpha * (a @ b) for 2-D or batched 3-D operands (any of them transposed in its last two
// dimensions). libtorch_cpu exports it but ships no header for it, and PyTorch only routes float32 products
// there in reduced precision, so it is looked up by name at run time: a torch build without it leaves
// onednn_gemm_available() false and model/utils/cpu_conv.py on torch.bmm.
using MkldnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

MkldnnMatmul mkldnn_matmul() {
  static const MkldnnMatmul fn = reinterpret_cast<MkldnnMatmul>(
      dlsym(RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
  return fn;
}

bool onednn_gemm_available() { return mkldnn_matmul() != nullptr; }

// out (B, M, N) = beta * out + a (B, M, K) @ b (B, K, N), float32, on oneDNN; beta is 0 or 1.
void onednn_gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor out, double beta) {
  TORCH_CHECK(onednn_gemm_available(), "winograd onednn_gemm: this torch build has no oneDNN matmul");
  for (const at::Tensor* t : {&a, &b, static_cast<const at::Tensor*>(&out)}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3,
                "winograd onednn_gemm: operands must be 3-D float32 CPU tensors");
  }
  TORCH_CHECK(out.is_contiguous(), "winograd onednn_gemm: out must be contiguous");
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(0) == out.size(0) && a.size(1) == out.size(1) &&
                  a.size(2) == b.size(1) && b.size(2) == out.size(2),
              "winograd onednn_gemm: shapes must be (B, M, K) @ (B, K, N) -> (B, M, N)");
  TORCH_CHECK(beta == 0.0 || beta == 1.0, "winograd onednn_gemm: beta must be 0 or 1");
  mkldnn_matmul()(a, b, out, static_cast<float>(beta), 1.0f);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Winograd F(2x2, 3x3) tile transforms (see winograd.cpp)";
  module.def("input_transform", &input_transform, "x (N,H,W,C), t0, v (16,T,C): v = B^T d B of tiles t0..");
  module.def("output_transform", &output_transform,
             "m (16,T,K), bias (K,) or empty, t0, y (N,H,W,K): y = A^T m A + bias of tiles t0..");
  module.def("output_adjoint", &output_adjoint,
             "grad (N,H,W,K), t0, dm (16,T,K): dm = A grad A^T of tiles t0.. (output_transform's adjoint)");
  module.def("onednn_gemm_available", &onednn_gemm_available, "whether this torch exports oneDNN's matmul");
  module.def("onednn_gemm", &onednn_gemm, "a (B,M,K), b (B,K,N), out (B,M,N), beta 0|1: out = beta out + a @ b");
}
