// cuDNN descriptors are created here for real (cuDNN needs no GPU for them), and the output
// shape cuDNN derives must be the CPU conv2d's over a grid of shapes, strides, paddings,
// dilations, groups, dtypes and layouts.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cuda/cudnn_desc.hpp>

using namespace mixprec;
using namespace mixprec::gpu;

TEST(CudnnDescriptors, OutputShapesMatchCpuConvOverAGrid) {
  int checked = 0;
  for (int64_t H : {1, 5, 8, 13})
    for (int64_t K : {1, 3, 5})
      for (int64_t S : {1, 2, 3})
        for (int64_t P : {0, 1, 2})
          for (int64_t D : {1, 2})
            for (int64_t G : {1, 2, 4}) {
              const int64_t C = 4, O = 8, W = H + 2;
              if (H + 2 * P < D * (K - 1) + 1) continue;  // kernel larger than the padded input: refused below
              ConvShape s;
              s.N = 2, s.C = C, s.H = H, s.W = W, s.O = O, s.KH = K, s.KW = K == 1 ? 1 : K - 1;
              s.SH = S, s.SW = S == 1 ? 2 : S, s.PH = P, s.PW = P, s.DH = D, s.DW = 1, s.G = G;
              if (W + 2 * s.PW < s.DW * (s.KW - 1) + 1) continue;
              const Tensor y = conv2d(zeros({s.N, C, H, W}), zeros({O, C / G, s.KH, s.KW}), Tensor(), {s.SH, s.SW}, {s.PH, s.PW},
                                      {s.DH, s.DW}, G);
              for (DType dt : {DType::Float32, DType::Float16, DType::BFloat16})
                for (ConvLayout layout : {ConvLayout::NCHW, ConvLayout::NHWC}) {
                  s.dtype = dt;
                  s.layout = layout;
                  const ConvDescriptors d = make_conv_descriptors(s);
                  ASSERT_EQ(Shape(d.y_shape.begin(), d.y_shape.end()), y.sizes())
                      << "H " << H << " W " << W << " K " << s.KH << "x" << s.KW << " stride " << S << " pad " << P << " dil " << D
                      << " groups " << G << " " << dt;
                  ++checked;
                }
            }
  EXPECT_GT(checked, 1000);
}

TEST(CudnnDescriptors, DescriptorsHoldWhatWasSet) {
  ConvShape s;
  s.N = 3, s.C = 6, s.H = 10, s.W = 12, s.O = 9, s.KH = 3, s.KW = 5, s.SH = 2, s.SW = 1, s.PH = 1, s.PW = 2, s.DH = 2, s.DW = 1,
  s.G = 3, s.dtype = DType::BFloat16, s.layout = ConvLayout::NHWC;
  const ConvDescriptors d = make_conv_descriptors(s);
  int ph, pw, sh, sw, dh, dw;
  cudnnConvolutionMode_t mode;
  cudnnDataType_t compute;
  ASSERT_EQ(cudnnGetConvolution2dDescriptor(d.conv.get(), &ph, &pw, &sh, &sw, &dh, &dw, &mode, &compute), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ((std::array<int, 6>({ph, pw, sh, sw, dh, dw})), (std::array<int, 6>({1, 2, 2, 1, 2, 1})));
  EXPECT_EQ(mode, CUDNN_CROSS_CORRELATION);  // what deep-learning "convolution" means, as the CPU kernel
  EXPECT_EQ(compute, CUDNN_DATA_FLOAT);      // bfloat16 storage, float32 accumulation
  int groups = 0;
  ASSERT_EQ(cudnnGetConvolutionGroupCount(d.conv.get(), &groups), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ(groups, 3);
  cudnnMathType_t math;
  ASSERT_EQ(cudnnGetConvolutionMathType(d.conv.get(), &math), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ(math, CUDNN_TENSOR_OP_MATH);
  cudnnDataType_t wt;
  cudnnTensorFormat_t fmt;
  int k, c, kh, kw;
  ASSERT_EQ(cudnnGetFilter4dDescriptor(d.w.get(), &wt, &fmt, &k, &c, &kh, &kw), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ((std::array<int, 4>({k, c, kh, kw})), (std::array<int, 4>({9, 2, 3, 5})));
  EXPECT_EQ(wt, CUDNN_DATA_BFLOAT16);
  EXPECT_EQ(fmt, CUDNN_TENSOR_NHWC);
  // NHWC strides: C is the unit stride.
  cudnnDataType_t xt;
  int n, cc, h, w, ns, cs, hs, ws;
  ASSERT_EQ(cudnnGetTensor4dDescriptor(d.x.get(), &xt, &n, &cc, &h, &w, &ns, &cs, &hs, &ws), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ((std::array<int, 4>({ns, cs, hs, ws})), (std::array<int, 4>({10 * 12 * 6, 1, 12 * 6, 6})));
  // float32 stays float32 unless tf32 is asked for.
  s.dtype = DType::Float32;
  s.layout = ConvLayout::NCHW;
  ASSERT_EQ(cudnnGetConvolutionMathType(make_conv_descriptors(s).conv.get(), &math), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ(math, CUDNN_FMA_MATH);
  s.allow_tf32 = true;
  ASSERT_EQ(cudnnGetConvolutionMathType(make_conv_descriptors(s).conv.get(), &math), CUDNN_STATUS_SUCCESS);
  EXPECT_EQ(math, CUDNN_TENSOR_OP_MATH);
}

TEST(CudnnDescriptors, BadGeometryIsAMixprecError) {
  ConvShape s;
  s.C = 6, s.O = 4, s.G = 4, s.H = s.W = 8, s.KH = s.KW = 3;
  EXPECT_THROW(make_conv_descriptors(s), Error);  // 6 channels in 4 groups
  s.G = 2;
  s.KH = 11;  // larger than the input
  try {
    make_conv_descriptors(s);
    FAIL() << "a kernel larger than the input must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("smaller than the dilated kernel"), std::string::npos) << e.what();
  }
  s.KH = 3;
  s.dtype = DType::Float64;
  EXPECT_THROW(make_conv_descriptors(s), Error);
}

// The convolution plan cache's key is the whole ConvShape.
TEST(CudnnPlans, ShapeKeySeesEveryField) {
  ConvShape a;
  a.N = 8, a.C = 16, a.H = 32, a.W = 32, a.O = 32, a.KH = 3, a.KW = 3, a.PH = 1, a.PW = 1;
  ConvShape b = a;
  EXPECT_EQ(a, b);
  EXPECT_EQ(ConvShapeHash{}(a), ConvShapeHash{}(b));
  const std::vector<void (*)(ConvShape&)> edits = {
      [](ConvShape& s) { s.N = 4; },  [](ConvShape& s) { s.SH = 2; },          [](ConvShape& s) { s.G = 2; },
      [](ConvShape& s) { s.DW = 2; }, [](ConvShape& s) { s.dtype = DType::BFloat16; }, [](ConvShape& s) { s.layout = ConvLayout::NHWC; },
      [](ConvShape& s) { s.allow_tf32 = true; }};
  for (auto edit : edits) {
    ConvShape c = a;
    edit(c);
    EXPECT_FALSE(c == a);
  }
}

// Find's records become the candidates a call tries, in Find's order (fastest first), each with
// the math type it was measured with; float32 without tf32 never runs tensor-core math.
TEST(CudnnPlans, CandidatesKeepFindsOrderAndMathType) {
  auto perf = [](cudnnConvolutionFwdAlgo_t algo, cudnnStatus_t st, size_t mem, cudnnMathType_t math) {
    cudnnConvolutionFwdAlgoPerf_t p{};
    p.algo = algo;
    p.status = st;
    p.memory = mem;
    p.mathType = math;
    return p;
  };
  const cudnnConvolutionFwdAlgoPerf_t found[] = {
      perf(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, CUDNN_STATUS_SUCCESS, 1024, CUDNN_TENSOR_OP_MATH),
      perf(CUDNN_CONVOLUTION_FWD_ALGO_FFT, CUDNN_STATUS_SUCCESS, size_t{1} << 31, CUDNN_DEFAULT_MATH),  // over the limit
      perf(CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD, CUDNN_STATUS_NOT_SUPPORTED, 0, CUDNN_DEFAULT_MATH),     // did not run
      perf(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, CUDNN_STATUS_SUCCESS, 0, CUDNN_DEFAULT_MATH),
      perf(CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, CUDNN_STATUS_SUCCESS, 0, CUDNN_DEFAULT_MATH),  // a repeat
      perf(CUDNN_CONVOLUTION_FWD_ALGO_GEMM, CUDNN_STATUS_SUCCESS, 64, CUDNN_FMA_MATH),
  };
  ConvShape s;
  s.dtype = DType::BFloat16;
  auto c = conv_candidates(found, 6, s, size_t{1} << 30);
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].algo, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM);
  EXPECT_EQ(c[0].math, CUDNN_TENSOR_OP_MATH);  // tensor cores, applied to the descriptor before the call
  EXPECT_EQ(c[0].workspace, 1024u);
  EXPECT_EQ(c[1].algo, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
  EXPECT_EQ(c[1].math, CUDNN_DEFAULT_MATH);
  EXPECT_EQ(c[2].algo, CUDNN_CONVOLUTION_FWD_ALGO_GEMM);
  // A smaller workspace bound drops what does not fit.
  c = conv_candidates(found, 6, s, 512);
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].algo, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
  // float32 without tf32: the tensor-core record is dropped, the rest run under FMA math.
  s.dtype = DType::Float32;
  c = conv_candidates(found, 6, s, size_t{1} << 30);
  ASSERT_EQ(c.size(), 2u);
  for (const auto& k : c) EXPECT_EQ(k.math, CUDNN_FMA_MATH);
  EXPECT_EQ(conv_math_type(s, CUDNN_TENSOR_OP_MATH), CUDNN_FMA_MATH);
  s.allow_tf32 = true;
  EXPECT_EQ(conv_candidates(found, 6, s, size_t{1} << 30).size(), 3u);
  EXPECT_EQ(conv_math_type(s, CUDNN_TENSOR_OP_MATH), CUDNN_TENSOR_OP_MATH);
  // The math type set on a real descriptor is the one a call runs with.
  const ConvDescriptors d = make_conv_descriptors(s);
  for (cudnnMathType_t m : {CUDNN_TENSOR_OP_MATH, CUDNN_FMA_MATH, CUDNN_DEFAULT_MATH}) {
    check_cudnn(cudnnSetConvolutionMathType(d.conv.get(), m), "cudnnSetConvolutionMathType");
    cudnnMathType_t got{};
    check_cudnn(cudnnGetConvolutionMathType(d.conv.get(), &got), "cudnnGetConvolutionMathType");
    EXPECT_EQ(got, m);
  }
}
