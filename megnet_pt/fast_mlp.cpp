// The fast step (megnet_pt/fast.py): a whole MLP, and a whole MEGNetConv update, as one autograd node each, in C++.
//
//   z_l = h_{l-1} W_l^T + b_l,   h_l = act(z_l)   (h_0 = x, or act(x) with activate_input)
//   backward, last layer first:  g <- g * act'(z_l);  dW_l = g^T h_{l-1};  db_l = sum_i g_i;  g <- g W_l
//
// softplus2(z) = log(1 + e^z) - log 2 and its slope, the logistic sigmoid, come out of one pass over z
// (one exponential, one logarithm's series, two divisions, vectorised by the compiler), so the backward
// multiplies by a saved slope and computes no exponential. ReLU's backward reads its output.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t SOFTPLUS2 = 0;
constexpr int64_t RELU = 1;

// e^t for t <= 0: 2^n e^f with n = round(t / ln 2), |f| <= ln 2 / 2, e^f by its degree-7 Taylor polynomial
// (relative error below 2e-7); t below -87 gives 0.
inline float exp_nonpositive(float t) {
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  t = t < -87.0f ? -87.0f : t;
  float n = (t * log2e + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  float f = t - n * ln2_hi - n * ln2_lo;
  float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720 + f * (1.0f / 5040)))))));
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// log(1 + e) for 0 <= e <= 1: 2 atanh(s) with s = e / (2 + e) <= 1/3, its series to s^15 (error below 2e-9).
inline float log1p_unit(float e) {
  float s = e / (2.0f + e), q = s * s;
  float p = 1.0f + q * (1.0f / 3 + q * (1.0f / 5 + q * (1.0f / 7 + q * (1.0f / 9 + q * (1.0f / 11 + q * (1.0f / 13 + q * (1.0f / 15)))))));
  return 2.0f * s * p;
}

// h = softplus2(z) and, when slope is given, slope = sigmoid(z); float32, contiguous.
void softplus2_kernel(const float* __restrict z, float* __restrict h, float* __restrict slope, int64_t n) {
  const float ln2 = 0.693147180559945309f;
  if (slope) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float v = z[i], e = exp_nonpositive(-std::fabs(v)), r = 1.0f / (1.0f + e);
      h[i] = (v > 0.0f ? v : 0.0f) + log1p_unit(e) - ln2;
      slope[i] = v >= 0.0f ? r : e * r;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float v = z[i];
      h[i] = (v > 0.0f ? v : 0.0f) + log1p_unit(exp_nonpositive(-std::fabs(v))) - ln2;
    }
  }
}

// z <- softplus2(z + r) in place, r the per-row addend of each row (below), and slope = sigmoid(z + r) when given.
// The addend is the bias b (a Linear layer: one pass less than addmm, which copies b into its output first), or
// for the edge MLP's first layer b + the per-graph, source and target parts gathered to the edge (conv_forward),
// added in addmm's order, so the sums are the same as unfused.
struct RowAddend {
  const float* bias;  // [cols]
  const float *graph = nullptr, *ends = nullptr;  // [B, cols] (bias included); [N, 2 cols]: source | target part
  const int64_t *ebatch = nullptr, *src = nullptr, *dst = nullptr;
};

// one row: z <- softplus2(z + a [+ s + t]), slope when given
template <bool kEnds, bool kSlope>
inline void softplus2_row(float* __restrict z, float* __restrict slope, const float* __restrict a,
                          const float* __restrict s, const float* __restrict t, int64_t cols) {
  const float ln2 = 0.693147180559945309f;
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    float v = z[j] + a[j];
    if constexpr (kEnds) v = (v + s[j]) + t[j];
    float e = exp_nonpositive(-std::fabs(v)), q = 1.0f / (1.0f + e);
    z[j] = (v > 0.0f ? v : 0.0f) + log1p_unit(e) - ln2;
    if constexpr (kSlope) slope[j] = v >= 0.0f ? q : e * q;
  }
}

template <bool kEnds, bool kSlope>
void softplus2_rows_of(float* z, float* slope, int64_t rows, int64_t cols, const RowAddend& r) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* a = kEnds ? r.graph + r.ebatch[i] * cols : r.bias;
    const float* s = kEnds ? r.ends + r.src[i] * 2 * cols : nullptr;
    const float* t = kEnds ? r.ends + r.dst[i] * 2 * cols + cols : nullptr;
    softplus2_row<kEnds, kSlope>(z + i * cols, kSlope ? slope + i * cols : nullptr, a, s, t, cols);
  }
}

void softplus2_rows(float* z, float* slope, int64_t rows, int64_t cols, const RowAddend& r) {
  if (r.ends) {
    slope ? softplus2_rows_of<true, true>(z, slope, rows, cols, r) : softplus2_rows_of<true, false>(z, slope, rows, cols, r);
  } else {
    slope ? softplus2_rows_of<false, true>(z, slope, rows, cols, r) : softplus2_rows_of<false, false>(z, slope, rows, cols, r);
  }
}

bool fusable(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.device().is_cpu(); }

// act(z); *saved gets what the backward reads (softplus2: the slope; ReLU: the output).
at::Tensor activate(const at::Tensor& z, int64_t act, at::Tensor* saved) {
  if (act == RELU) {
    at::Tensor h = at::relu(z);
    if (saved) *saved = h;
    return h;
  }
  if (z.scalar_type() != at::kFloat || !z.device().is_cpu()) {  // float64 (gradcheck), CUDA: ATen's own kernels
    at::Tensor h = at::softplus(z) - M_LN2;
    if (saved) *saved = at::sigmoid(z);
    return h;
  }
  at::Tensor zc = z.contiguous(), h = at::empty_like(zc);
  at::Tensor slope = saved ? at::empty_like(zc) : at::Tensor();
  softplus2_kernel(zc.data_ptr<float>(), h.data_ptr<float>(), saved ? slope.data_ptr<float>() : nullptr, zc.numel());
  if (saved) *saved = slope;
  return h;
}

// act(h W^T + b), *saved as activate's; float32 softplus2 on a CPU adds the bias in the activation's pass.
at::Tensor linear_activate(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, int64_t act, at::Tensor* saved) {
  if (act != SOFTPLUS2 || !fusable(h)) return activate(at::addmm(b, h, w.t()), act, saved);
  at::Tensor z = h.mm(w.t()), bias = b.contiguous();
  at::Tensor slope = saved ? at::empty_like(z) : at::Tensor();
  softplus2_rows(z.data_ptr<float>(), saved ? slope.data_ptr<float>() : nullptr, z.size(0), z.size(1),
                 RowAddend{bias.data_ptr<float>()});
  if (saved) *saved = slope;
  return z;
}

at::Tensor activation_backward(const at::Tensor& g, const at::Tensor& saved, int64_t act) {
  return act == RELU ? at::threshold_backward(g, saved, 0) : g * saved;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What an MLP's backward reads, flat for save_for_backward: the input's saved tensor, then per layer its input,
// its activation's saved tensor (undefined where not activated) and its weight.
constexpr int64_t TAPE_PER_LAYER = 3;

at::Tensor mlp_forward(const at::Tensor& x, at::TensorList params, int64_t act, bool activate_last, bool activate_input,
                       std::vector<at::Tensor>* tape) {
  const size_t k = params.size() / 2;
  at::Tensor input_saved, h = activate_input ? activate(x, act, tape ? &input_saved : nullptr) : x;
  if (tape) tape->push_back(input_saved);
  for (size_t l = 0; l < k; ++l) {
    const at::Tensor &w = params[2 * l], &b = params[2 * l + 1];
    at::Tensor act_saved;
    if (tape) tape->push_back(h);
    h = (l < k - 1 || activate_last) ? linear_activate(h, w, b, act, tape ? &act_saved : nullptr) : at::addmm(b, h, w.t());
    if (tape) {
      tape->push_back(act_saved);
      tape->push_back(w);
    }
  }
  return h;
}

// The backward of mlp_forward from tape[at...]: the parameters' gradients into grads[first...] where needs[l] says so,
// and the input's gradient (undefined unless need_input).
at::Tensor mlp_backward(at::Tensor g, const variable_list& tape, size_t at, size_t k, int64_t act, bool need_input,
                        const std::vector<bool>& needs, variable_list& grads, size_t first) {
  for (int64_t l = static_cast<int64_t>(k) - 1; l >= 0; --l) {
    const size_t t = at + 1 + TAPE_PER_LAYER * l;
    const at::Tensor &h_in = tape[t], &act_saved = tape[t + 1], &w = tape[t + 2];
    if (act_saved.defined()) g = activation_backward(g, act_saved, act);
    if (needs[2 * l]) grads[first + 2 * l] = g.t().mm(h_in);
    if (needs[2 * l + 1]) grads[first + 2 * l + 1] = g.sum(0);
    if (l == 0 && !need_input) return at::Tensor();
    g = g.mm(w);
  }
  if (tape[at].defined()) g = activation_backward(g, tape[at], act);
  return g;
}

std::vector<bool> needs_of(AutogradContext* ctx, size_t first, size_t n) {
  std::vector<bool> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = ctx->needs_input_grad(first + i);
  return out;
}

struct MLPFunction : public torch::autograd::Function<MLPFunction> {
  // params: w_1, b_1, ..., w_k, b_k (nn.Linear layout: w_l is [out, in])
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::TensorList params, int64_t act, bool activate_last,
                            bool activate_input) {
    std::vector<at::Tensor> tape;
    at::Tensor h = mlp_forward(x, params, act, activate_last, activate_input, &tape);
    ctx->save_for_backward(tape);
    ctx->saved_data["k"] = static_cast<int64_t>(params.size() / 2);
    ctx->saved_data["act"] = act;
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const size_t k = ctx->saved_data["k"].toInt();
    variable_list grads(1 + 2 * k + 3);  // x, the parameters, then act, activate_last, activate_input (no gradient)
    grads[0] = mlp_backward(grad_outputs[0], ctx->get_saved_variables(), 0, k, ctx->saved_data["act"].toInt(),
                            ctx->needs_input_grad(0), needs_of(ctx, 1, 2 * k), grads, 1);
    return grads;
  }
};

at::Tensor mlp(const at::Tensor& x, std::vector<at::Tensor> params, int64_t act, bool activate_last, bool activate_input) {
  if (!at::GradMode::is_enabled()) return mlp_forward(x, params, act, activate_last, activate_input, nullptr);
  return MLPFunction::apply(x, at::TensorList(params), act, activate_last, activate_input);
}

// mean over groups: sum of rows of x with the same index, times 1 / the group's size ([size, 1])
at::Tensor mean_by(const at::Tensor& x, const at::Tensor& index, const at::Tensor& inv_count) {
  return at::zeros({inv_count.size(0), x.size(1)}, x.options()).index_add_(0, index, x).mul_(inv_count);
}

at::Tensor sum_by(const at::Tensor& x, const at::Tensor& index, int64_t size) {
  return at::zeros({size, x.size(1)}, x.options()).index_add_(0, index, x);
}

// MEGNetConv (megnet_pt/conv.py), softplus2 MLPs with their last layers activated, as one autograd node. The edge
// MLP's first layer W = [W_s | W_t | W_e | W_u] is applied per atom (v [W_s | W_t]^T, both ends in one product), per
// graph (u W_u^T + b) and per edge (e W_e^T) and the parts gathered to the edges.
// index: source, target, edge_batch, batch, 1/in-degree [N,1], 1/edges [B,1], 1/atoms [B,1] (megnet_pt.fast.GraphIndex)
// params: the edge MLP's, then the node MLP's, then the state MLP's (w, b per layer); layers: their layer counts.
// *saved (when given) gets what ConvFunction's backward reads; without it nothing is kept and no slope computed.
variable_list conv_forward(const at::Tensor& x, const at::Tensor& e, const at::Tensor& u, at::TensorList params,
                           at::TensorList index, const std::vector<int64_t>& layers, std::vector<at::Tensor>* saved) {
  const at::Tensor &src = index[0], &dst = index[1], &ebatch = index[2], &nbatch = index[3];
  const int64_t dv = x.size(1), de = e.size(1), du = u.size(1), ke = layers[0], kn = layers[1], ks = layers[2];
  const at::Tensor& w1 = params[0];
  const int64_t width = w1.size(0);
  at::Tensor w_ends = w1.narrow(1, 0, 2 * dv).reshape({width, 2, dv}).transpose(0, 1).reshape({2 * width, dv});
  at::Tensor ends = x.mm(w_ends.t());  // [N, 2 width]: source part | target part
  at::Tensor per_graph = at::addmm(params[1], u, w1.narrow(1, 2 * dv + de, du).t());
  if (saved) saved->insert(saved->end(), {x, e, u, w_ends, w1});
  at::Tensor e_new;
  if (fusable(e)) {  // h = softplus2(e W_e^T + per_graph[g] + ends_s[i] + ends_t[j]) in one pass over the edges
    at::Tensor h = e.mm(w1.narrow(1, 2 * dv, de).t()), graph = per_graph.contiguous();
    at::Tensor eb = ebatch.contiguous(), s = src.contiguous(), t = dst.contiguous();
    at::Tensor slope = saved ? at::empty_like(h) : at::Tensor();
    RowAddend parts{nullptr, graph.data_ptr<float>(), ends.data_ptr<float>(), eb.data_ptr<int64_t>(),
                    s.data_ptr<int64_t>(), t.data_ptr<int64_t>()};
    softplus2_rows(h.data_ptr<float>(), saved ? slope.data_ptr<float>() : nullptr, h.size(0), width, parts);
    const size_t input_at = saved ? saved->size() : 0;
    e_new = mlp_forward(h, params.slice(2, 2 * (ke - 1)), SOFTPLUS2, true, false, saved);
    if (saved) (*saved)[input_at] = slope;  // the first layer's activation, as activate_input would have saved it
  } else {
    at::Tensor pre = at::addmm(per_graph.index_select(0, ebatch), e, w1.narrow(1, 2 * dv, de).t());
    pre.add_(ends.narrow(1, 0, width).index_select(0, src)).add_(ends.narrow(1, width, width).index_select(0, dst));
    e_new = mlp_forward(pre, params.slice(2, 2 * (ke - 1)), SOFTPLUS2, true, true, saved);
  }
  at::Tensor incoming = mean_by(e_new, dst, index[4]);
  at::Tensor x_new = mlp_forward(at::cat({x, incoming, u.index_select(0, nbatch)}, 1), params.slice(2 * ke, 2 * kn),
                                 SOFTPLUS2, true, false, saved);
  at::Tensor u_in = at::cat({u, mean_by(e_new, ebatch, index[5]), mean_by(x_new, nbatch, index[6])}, 1);
  at::Tensor u_new = mlp_forward(u_in, params.slice(2 * (ke + kn), 2 * ks), SOFTPLUS2, true, false, saved);
  if (saved) saved->insert(saved->end(), index.begin(), index.end());
  return {e_new, x_new, u_new};
}

struct ConvFunction : public torch::autograd::Function<ConvFunction> {
  static variable_list forward(AutogradContext* ctx, at::Tensor x, at::Tensor e, at::Tensor u, at::TensorList params,
                               at::TensorList index, std::vector<int64_t> layers) {
    std::vector<at::Tensor> saved;
    variable_list out = conv_forward(x, e, u, params, index, layers, &saved);
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = layers;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list s = ctx->get_saved_variables();
    const auto layers = ctx->saved_data["layers"].toIntVector();
    const size_t ke = layers[0], kn = layers[1], ks = layers[2], num_params = 2 * (ke + kn + ks);
    const at::Tensor &x = s[0], &e = s[1], &u = s[2], &w_ends = s[3], &w1 = s[4];
    const size_t edge_at = 5, node_at = edge_at + 1 + TAPE_PER_LAYER * (ke - 1), state_at = node_at + 1 + TAPE_PER_LAYER * kn;
    const size_t index_at = state_at + 1 + TAPE_PER_LAYER * ks;
    const at::Tensor &src = s[index_at], &dst = s[index_at + 1], &ebatch = s[index_at + 2], &nbatch = s[index_at + 3];
    const at::Tensor &inv_in = s[index_at + 4], &inv_edges = s[index_at + 5], &inv_nodes = s[index_at + 6];
    const int64_t n = x.size(0), b = u.size(0), dv = x.size(1), de = e.size(1), du = u.size(1), width = w1.size(0);
    auto last_width = [&](size_t at, size_t k) { return s[at + TAPE_PER_LAYER * k].size(0); };  // last layer's weight rows
    const int64_t d_edge = last_width(edge_at, ke - 1), d_node = last_width(node_at, kn), d_state = last_width(state_at, ks);
    auto grad_or_zeros = [](const at::Tensor& g, int64_t rows, int64_t cols, const at::Tensor& like) {
      return g.defined() ? g : at::zeros({rows, cols}, like.options());
    };
    at::Tensor g_e = grad_or_zeros(grad_outputs[0], e.size(0), d_edge, e);
    at::Tensor g_x = grad_or_zeros(grad_outputs[1], n, d_node, x);
    at::Tensor g_u_new = grad_or_zeros(grad_outputs[2], b, d_state, u);
    const size_t P = 3;  // gradients: x, e, u, the parameters, the index tensors, layers
    variable_list grads(P + num_params + 7 + 1);
    std::vector<bool> needs = needs_of(ctx, P, num_params);
    auto part = [&](size_t from, size_t count) { return std::vector<bool>(needs.begin() + from, needs.begin() + from + count); };
    // the state MLP, then the two means it read
    at::Tensor g_uin = mlp_backward(g_u_new, s, state_at, ks, SOFTPLUS2, true, part(2 * (ke + kn), 2 * ks), grads, P + 2 * (ke + kn));
    at::Tensor g_u = g_uin.narrow(1, 0, du).clone();
    g_e = g_e + g_uin.narrow(1, du, d_edge).mul(inv_edges).index_select(0, ebatch);
    g_x = g_x + g_uin.narrow(1, du + d_edge, d_node).mul(inv_nodes).index_select(0, nbatch);
    // the node MLP and what it read: x, the mean of the incoming edges, the state at each atom
    at::Tensor g_xin = mlp_backward(g_x, s, node_at, kn, SOFTPLUS2, true, part(2 * ke, 2 * kn), grads, P + 2 * ke);
    at::Tensor g_x_in = g_xin.narrow(1, 0, dv).clone();
    g_e.add_(g_xin.narrow(1, dv, d_edge).mul(inv_in).index_select(0, dst));
    g_u.add_(sum_by(g_xin.narrow(1, dv + d_edge, du), nbatch, b));
    // the edge MLP's layers 2.. and the first's activation, then the first layer's four parts
    at::Tensor g_pre = mlp_backward(g_e, s, edge_at, ke - 1, SOFTPLUS2, true, part(2, 2 * (ke - 1)), grads, P + 2);
    at::Tensor g_graph = sum_by(g_pre, ebatch, b);
    at::Tensor g_ends = at::cat({sum_by(g_pre, src, n), sum_by(g_pre, dst, n)}, 1);  // [N, 2 width]
    if (needs[0]) {
      at::Tensor g_w1 = at::empty_like(w1);
      g_w1.narrow(1, 0, 2 * dv).copy_(g_ends.t().mm(x).reshape({2, width, dv}).transpose(0, 1).reshape({width, 2 * dv}));
      g_w1.narrow(1, 2 * dv, de).copy_(g_pre.t().mm(e));
      g_w1.narrow(1, 2 * dv + de, du).copy_(g_graph.t().mm(u));
      grads[P] = g_w1;
    }
    if (needs[1]) grads[P + 1] = g_graph.sum(0);
    if (ctx->needs_input_grad(0)) grads[0] = g_x_in.add_(g_ends.mm(w_ends));
    if (ctx->needs_input_grad(1)) grads[1] = g_pre.mm(w1.narrow(1, 2 * dv, de));
    if (ctx->needs_input_grad(2)) grads[2] = g_u.add_(g_graph.mm(w1.narrow(1, 2 * dv + de, du)));
    return grads;
  }
};

variable_list conv(const at::Tensor& x, const at::Tensor& e, const at::Tensor& u, std::vector<at::Tensor> params,
                   std::vector<at::Tensor> index, std::vector<int64_t> layers) {
  if (!at::GradMode::is_enabled()) return conv_forward(x, e, u, params, index, layers, nullptr);
  return ConvFunction::apply(x, e, u, at::TensorList(params), at::TensorList(index), layers);
}

at::Tensor softplus2(const at::Tensor& z) { return activate(z, SOFTPLUS2, nullptr); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mlp", &mlp, "the MLP as one autograd node (act: 0 softplus2, 1 ReLU)");
  m.def("conv", &conv, "MEGNetConv as one autograd node: (edge_attr, x, state)");
  m.def("softplus2", &softplus2, "softplus2, no gradient: the kernel alone");
}
