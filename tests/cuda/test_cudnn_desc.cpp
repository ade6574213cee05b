// cuDNN descriptors are created here for real (cuDNN needs no GPU for them), and the output
// shape cuDNN derives must be the CPU conv2d's over a grid of shapes, strides, paddings,
// dilations, groups, dtypes and layouts; and what the channels-last (NHWC) entries hand cuDNN.
#include <gtest/gtest.h>

#include <mixprec/mixprec.hpp>
#include <mixprec/backends/cuda/channels_last.hpp>
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

// ---- Channels-last activations (backends/cuda/channels_last.hpp): what the CUDA conv and
// batch-norm entries hand cuDNN, checked on CPU tensors of the same shapes and strides. ----

namespace {
// Values of t in logical row-major order.
std::vector<float> values(const Tensor& t) {
  const Tensor c = t.to(DType::Float32).contiguous();
  const float* p = c.data<float>();
  return std::vector<float>(p, p + c.numel());
}
Shape cudnn_strides(const TensorDescriptor& d) {
  cudnnDataType_t dt;
  int n, c, h, w, ns, cs, hs, ws;
  check_cudnn(cudnnGetTensor4dDescriptor(d.get(), &dt, &n, &c, &h, &w, &ns, &cs, &hs, &ws), "cudnnGetTensor4dDescriptor");
  return {ns, cs, hs, ws};
}
}  // namespace

TEST(CudnnChannelsLast, LayoutIsTheOpLayersChoice) {
  const Tensor x = randn({2, 3, 4, 5});
  EXPECT_EQ(activation_layout(x), ConvLayout::NCHW);
  EXPECT_EQ(activation_layout(x.contiguous(MemoryFormat::ChannelsLast)), ConvLayout::NHWC);
  // C = 1 and H = W = 1: either layout holds the same bytes; the strides say which the producer
  // chose, and the entries follow them as detail::kernel_layout does (suggest_memory_format).
  for (const Shape& s : {Shape{2, 1, 4, 5}, Shape{2, 8, 1, 1}}) {
    EXPECT_EQ(activation_layout(randn(s)), ConvLayout::NCHW) << ::testing::PrintToString(s);
    EXPECT_EQ(activation_layout(randn(s).contiguous(MemoryFormat::ChannelsLast)), ConvLayout::NHWC) << ::testing::PrintToString(s);
  }
  EXPECT_EQ(activation_layout(randn({2, 3, 4})), ConvLayout::NCHW);
  EXPECT_EQ(activation_layout(x.contiguous(MemoryFormat::ChannelsLast).slice(2, 0, 2)), ConvLayout::NCHW);  // not dense: the op copies
}

TEST(CudnnChannelsLast, NhwcViewIsTheSameBytesAndRoundTrips) {
  const Tensor x = randn({3, 6, 4, 5}).contiguous(MemoryFormat::ChannelsLast);
  const Tensor v = nhwc_view("test", x);
  EXPECT_EQ(v.sizes(), (Shape{3, 4, 5, 6}));
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.data_ptr(), x.data_ptr());
  EXPECT_EQ(values(v), values(x.permute({0, 2, 3, 1})));
  const Tensor back = channels_last_view("test", v);
  EXPECT_EQ(back.sizes(), x.sizes());
  EXPECT_EQ(back.strides(), x.strides());
  EXPECT_TRUE(back.is_contiguous(MemoryFormat::ChannelsLast));
  EXPECT_EQ(back.suggest_memory_format(), MemoryFormat::ChannelsLast);
  EXPECT_EQ(values(back), values(x));
  // An NCHW tensor is refused by name: the entries never reinterpret NCHW bytes as NHWC.
  try {
    (void)nhwc_view("conv2d (cuda, channels-last)", randn({3, 6, 4, 5}));
    ADD_FAILURE() << "an NCHW tensor was taken as NHWC";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("conv2d (cuda, channels-last): expected a channels-last"), std::string::npos) << e.what();
  }
}

TEST(CudnnChannelsLast, FiltersInNhwcOrderAndBack) {
  // 3x3: a permuted view (one copy per call in the entry); 1x1 and depthwise: the same bytes.
  for (const Shape& s : {Shape{8, 4, 3, 3}, Shape{8, 4, 1, 1}, Shape{8, 1, 3, 3}, Shape{6, 2, 1, 3}}) {
    const Tensor w = randn(s);
    const Tensor v = filter_nhwc_order(w);
    EXPECT_EQ(v.sizes(), (Shape{s[0], s[2], s[3], s[1]})) << ::testing::PrintToString(s);
    const bool same = s[2] * s[3] == 1 || s[1] == 1;
    EXPECT_EQ(filter_bytes_match_nhwc(w), same) << ::testing::PrintToString(s);
    EXPECT_EQ(v.is_contiguous(), same) << ::testing::PrintToString(s);
    EXPECT_EQ(values(v), values(w.permute({0, 2, 3, 1}))) << ::testing::PrintToString(s);
    // cuDNN's NHWC weight gradient [O, KH, KW, C/G] back to the contract's [O, C/G, KH, KW].
    const Tensor g = randn({s[0], s[2], s[3], s[1]});
    const Tensor b = filter_nchw_order(g);
    EXPECT_EQ(b.sizes(), s);
    EXPECT_EQ(b.is_contiguous(), same) << ::testing::PrintToString(s);
    EXPECT_EQ(values(b), values(g.permute({0, 3, 1, 2}))) << ::testing::PrintToString(s);
  }
}

TEST(CudnnChannelsLast, NhwcDescriptorsDescribeChannelsLastStrides) {
  // cuDNN's NHWC descriptors of the logical [n, c, h, w] have exactly PyTorch's channels-last
  // strides: the entries hand cuDNN a channels-last tensor's bytes, and its NHWC output viewed
  // channels-last (channels_last_view) is what the op receives.
  ConvShape s;
  s.N = 4, s.C = 6, s.H = 9, s.W = 7, s.O = 10, s.KH = 3, s.KW = 3, s.SH = 2, s.SW = 2, s.PH = 1, s.PW = 1, s.G = 2;
  for (DType dt : {DType::Float32, DType::Float16, DType::BFloat16}) {
    s.dtype = dt;
    s.layout = ConvLayout::NHWC;
    const ConvDescriptors d = make_conv_descriptors(s);
    EXPECT_EQ(cudnn_strides(d.x), channels_last_strides({s.N, s.C, s.H, s.W})) << dt;
    const Shape ys(d.y_shape.begin(), d.y_shape.end());
    EXPECT_EQ(ys, (Shape{4, 10, 5, 4})) << dt;
    EXPECT_EQ(cudnn_strides(d.y), channels_last_strides(ys)) << dt;
    cudnnDataType_t wt;
    cudnnTensorFormat_t fmt;
    int k, c, h, w;
    check_cudnn(cudnnGetFilter4dDescriptor(d.w.get(), &wt, &fmt, &k, &c, &h, &w), "cudnnGetFilter4dDescriptor");
    EXPECT_EQ(fmt, CUDNN_TENSOR_NHWC);
    EXPECT_EQ((std::array<int, 4>{k, c, h, w}), (std::array<int, 4>{10, 3, 3, 3}));  // logical [O, C/G, KH, KW]
    // The NCHW descriptors of the same shape stay NCHW (unchanged path).
    s.layout = ConvLayout::NCHW;
    EXPECT_EQ(cudnn_strides(make_conv_descriptors(s).x), contiguous_strides({s.N, s.C, s.H, s.W})) << dt;
  }
  // The entries' plan cache keys NHWC and NCHW apart.
  ConvShape a = s, b = s;
  a.layout = ConvLayout::NCHW;
  b.layout = ConvLayout::NHWC;
  EXPECT_FALSE(a == b);
  EXPECT_NE(ConvShapeHash{}(a), ConvShapeHash{}(b));
}

TEST(CudnnChannelsLast, BatchNormDescriptorsAndModes) {
  EXPECT_EQ(batch_norm_mode(ConvLayout::NHWC, true), CUDNN_BATCHNORM_SPATIAL_PERSISTENT);
  EXPECT_EQ(batch_norm_mode(ConvLayout::NHWC, false), CUDNN_BATCHNORM_SPATIAL);
  EXPECT_EQ(batch_norm_mode(ConvLayout::NCHW, true), CUDNN_BATCHNORM_SPATIAL);  // NCHW unchanged
  for (DType dt : {DType::Float32, DType::Float16, DType::BFloat16})
    for (ConvLayout l : {ConvLayout::NCHW, ConvLayout::NHWC})
      for (bool training : {true, false}) {
        const BatchNormDescriptors d = make_batch_norm_descriptors(8, 16, 5, 3, dt, l, batch_norm_mode(l, training));
        EXPECT_EQ(cudnn_strides(d.x), l == ConvLayout::NHWC ? channels_last_strides({8, 16, 5, 3}) : contiguous_strides({8, 16, 5, 3}));
        cudnnDataType_t pt;
        int n, c, h, w, ns, cs, hs, ws;
        check_cudnn(cudnnGetTensor4dDescriptor(d.param.get(), &pt, &n, &c, &h, &w, &ns, &cs, &hs, &ws), "cudnnGetTensor4dDescriptor");
        EXPECT_EQ((std::array<int, 4>{n, c, h, w}), (std::array<int, 4>{1, 16, 1, 1})) << dt;
        EXPECT_EQ(pt, CUDNN_DATA_FLOAT) << dt;  // float32 [C] parameters and statistics for every x dtype
      }
}

TEST(CudnnChannelsLast, DenseTensorsAndSumsOverMemory) {
  const Tensor x = randn({4, 6, 5, 3}).contiguous(MemoryFormat::ChannelsLast);
  EXPECT_TRUE(is_dense(x));
  EXPECT_TRUE(is_dense(randn({4, 6})));
  EXPECT_TRUE(is_dense(randn({4, 6}).t()));
  EXPECT_FALSE(is_dense(x.slice(1, 0, 3)));
  EXPECT_FALSE(is_dense(randn({4, 1}).expand({4, 6})));
  // The sum a plan describes, computed as the GEMM would: ones[1, R] @ x[K1, R, K2].
  auto by_plan = [](const Tensor& t, const MemorySumPlan& p) {
    const float* base = t.data<float>();
    std::vector<float> out(static_cast<std::size_t>(p.K1 * p.K2), 0.0f);
    for (int64_t i = 0; i < p.K1; ++i)
      for (int64_t r = 0; r < p.R; ++r)
        for (int64_t j = 0; j < p.K2; ++j) out[static_cast<std::size_t>(i * p.K2 + j)] += base[(i * p.R + r) * p.K2 + j];
    return out;
  };
  auto expect_sum = [&](const Tensor& t, const Shape& dims, int64_t K1, int64_t R, int64_t K2) {
    std::vector<bool> red(static_cast<std::size_t>(t.dim()), false);
    for (int64_t d : dims) red[static_cast<std::size_t>(d)] = true;
    const MemorySumPlan p = plan_memory_sum(t, red);
    ASSERT_TRUE(p.ok) << ::testing::PrintToString(t.sizes()) << " over " << ::testing::PrintToString(dims);
    EXPECT_EQ((std::array<int64_t, 3>{p.K1, p.R, p.K2}), (std::array<int64_t, 3>{K1, R, K2})) << ::testing::PrintToString(t.sizes()) << " over " << ::testing::PrintToString(dims);
    const std::vector<float> want = values(sum(t, dims)), got = by_plan(t, p);
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-4) << i;
  };
  expect_sum(x, {0, 2, 3}, 1, 4 * 5 * 3, 6);  // a conv bias gradient
  expect_sum(x, {1}, 4 * 5 * 3, 6, 1);        // over channels
  // ResNet's global average pool on a device: mean over the blocks of a split view [N, C, 1, H, 1, W].
  const Tensor blocks = x.reshape({4, 6, 1, 5, 1, 3});
  EXPECT_FALSE(blocks.is_contiguous());
  expect_sum(blocks, {3, 5}, 4, 5 * 3, 6);
  // Kept dims that memory would permute ([H, W, C] for logical [C, H, W]), and non-dense views: no plan.
  EXPECT_FALSE(plan_memory_sum(x, {true, false, false, false}).ok);
  EXPECT_FALSE(plan_memory_sum(x.slice(2, 0, 4), {true, false, true, true}).ok);
  EXPECT_FALSE(plan_memory_sum(x, {true, false, true}).ok);  // wrong rank
}
