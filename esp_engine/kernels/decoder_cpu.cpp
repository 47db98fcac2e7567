// The decoder layers of a Llama-family pass in one call, for a CPU with AVX512 or AVX2 (vec_cpu.h).
//
// At one to a few rows a layer's arithmetic is small next to what Python and torch's dispatcher
// cost per op: a pass of a small model is hundreds of ops. Here a pass is one call that runs, per
// layer, the same kernels as the op-by-op path (ops_cpu.h) on buffers allocated once per call,
// and does the few steps between them (RoPE, the key/value stores, the residual adds) itself, with
// the roundings torch's ops make: every result has the bits of esp_engine/model.py's op-by-op
// pass (tests/esp_engine/test_cpu_decoder.py), so row invariance carries over unchanged.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <tuple>
#include <vector>

#include "ops_cpu.h"
#include "vec_cpu.h"

namespace {

constexpr int kLanes = esp::kVecLanes;
using esp::vf;

// A value as the dtype stores it: bf16 ops of torch round each result to bf16. The rounded mul
// and add below are never contracted into a fused multiply-add, which torch's separate ops do not
// do either.
inline vf as_stored(vf v, float*) { return v; }
inline vf as_stored(vf v, at::BFloat16*) { return esp::from_bf16(esp::to_bf16(v)); }

// A packed linear: `blocks` x `steps` vectors (cpu_kernels.pack) of the pass's dtype; or int8
// with one float32 scale per output padded to the blocks' width (cpu_kernels.pad_scales); or
// W8A8's u8 weights (cpu_kernels.pack_w8a8) with those scales. And its bias, kept in float32
// padded the same way.
using LinearSpec = std::tuple<torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>>;

struct Linear {
  torch::Tensor packed, scales, bias;
  int64_t n_out = 0, k_in = 0;
  bool w8a8 = false;

  Linear() = default;
  Linear(const LinearSpec& spec, c10::ScalarType dtype, int64_t n, int64_t k)
      : packed(std::get<0>(spec)), n_out(n), k_in(k) {
    const auto& [w, s, b] = spec;
    const bool int8 = w.scalar_type() == torch::kChar;
    w8a8 = w.scalar_type() == torch::kByte;
    TORCH_CHECK(w.dim() == 4 && w.is_contiguous() && w.size(0) * kLanes >= n && w.device().is_cpu(),
                "a weight packed by cpu_kernels.pack, of at least ", n, " outputs");
    TORCH_CHECK(w.scalar_type() == dtype || int8 || w8a8, "weights of the pass's dtype, int8 or W8A8");
    if (w8a8) {
      TORCH_CHECK(w.size(3) == 4 && w.size(1) * 4 >= k && w.size(1) * 4 - k < esp::kW8A8Group,
                  "the W8A8 weight takes ", w.size(1) * 4, " inputs; the layer gives it ", k);
    } else {
      TORCH_CHECK(w.size(3) == (dtype == torch::kBFloat16 ? 2 : 1), "weights packed for the pass's dtype");
      TORCH_CHECK(w.size(1) * w.size(3) == k, "the packed weight takes ", w.size(1) * w.size(3), " inputs; the layer gives it ", k);
    }
    TORCH_CHECK((int8 || w8a8) == s.has_value(), "integer weights take their scales, and only they");
    const int64_t width = w.size(0) * kLanes;
    if (s.has_value()) {
      TORCH_CHECK(s->scalar_type() == torch::kFloat && s->is_contiguous() && s->numel() == width,
                  "scales: float32, one per output padded to the blocks");
      scales = *s;
    }
    if (b.has_value()) bias = torch::constant_pad_nd(b->to(torch::kFloat), {0, width - n}).contiguous();
  }

  template <class T>
  void operator()(const T* x, int64_t rows, T* y) const {
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    if (w8a8)
      esp::linear_rows_w8a8(x, rows, k_in, packed.data_ptr<uint8_t>(), packed.size(0), packed.size(1), n_out,
                            scales.data_ptr<float>(), bp, y);
    else if (scales.defined())
      esp::linear_rows(x, rows, packed.data_ptr<int8_t>(), packed.size(0), packed.size(1), n_out,
                       scales.data_ptr<float>(), bp, y);
    else
      esp::linear_rows(x, rows, packed.data_ptr<T>(), packed.size(0), packed.size(1), n_out, bp, y);
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  Linear qkv, o, gate_up, down;
};

// One sequence's rows in the pass: rows [row0, row1) go to cache slots [slot0, slot0 + n) and see
// the slots `visible` [n, slot0 + n] marks (none: all of them).
struct Sequence {
  int64_t row0, row1, slot0;
  torch::Tensor keys, values;  // [layers, kv_heads, capacity, head_dim]
  const bool* visible;
  int64_t visible_row;
};

class CpuDecoder {
 public:
  CpuDecoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
             double scale, torch::Tensor rope_cos, torch::Tensor rope_sin_signed, std::vector<torch::Tensor> input_norms,
             std::vector<torch::Tensor> post_norms, std::vector<LinearSpec> qkv, std::vector<LinearSpec> o,
             std::vector<LinearSpec> gate_up, std::vector<LinearSpec> down)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), dim_(head_dim), intermediate_(intermediate),
        eps_((float)eps), scale_((float)scale), cos_(rope_cos.contiguous()), sin_(rope_sin_signed.contiguous()) {
    TORCH_CHECK(head_dim % (2 * kLanes) == 0 && head_dim <= 256, "head dim must be a multiple of 32, at most 256");
    TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of key heads");
    dtype_ = cos_.scalar_type();
    TORCH_CHECK(dtype_ == torch::kFloat || dtype_ == torch::kBFloat16, "float32 or bfloat16 only");
    TORCH_CHECK(cos_.dim() == 2 && cos_.size(1) == head_dim && sin_.sizes() == cos_.sizes() &&
                sin_.scalar_type() == dtype_, "RoPE tables [positions, head_dim]");
    const size_t n = input_norms.size();
    TORCH_CHECK(post_norms.size() == n && qkv.size() == n && o.size() == n && gate_up.size() == n && down.size() == n,
                "one of each weight per layer");
    const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    for (size_t i = 0; i < n; ++i) {
      for (const auto* t : {&input_norms[i], &post_norms[i]})
        TORCH_CHECK(t->scalar_type() == dtype_ && t->device().is_cpu() && t->numel() == hidden,
                    "norm weights [hidden] of the pass's dtype, on the CPU");
      layers_.push_back({input_norms[i].contiguous(), post_norms[i].contiguous(),
                         Linear(qkv[i], dtype_, q_size + 2 * kv_size, hidden), Linear(o[i], dtype_, hidden, q_size),
                         Linear(gate_up[i], dtype_, 2 * intermediate, hidden),
                         Linear(down[i], dtype_, hidden, intermediate)});
    }
  }

  // The layers over rows x [R, hidden] at `positions` [R]; returns the residual stream after the
  // last layer (before the final norm). Sequence b's rows are [row_bounds[b], row_bounds[b+1]);
  // their keys and values go to slots slot_starts[b]... of keys[b] / values[b] ([layers,
  // kv_heads, capacity, head_dim]); visible[b] is its [rows, slot + rows] mask or None.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& positions, const std::vector<torch::Tensor>& keys,
                        const std::vector<torch::Tensor>& values, const std::vector<int64_t>& row_bounds,
                        const std::vector<int64_t>& slot_starts,
                        const std::vector<c10::optional<torch::Tensor>>& visible) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.scalar_type() == dtype_, "x [rows, hidden] of the weights' dtype");
    TORCH_CHECK(positions.dim() == 1 && positions.size(0) == x.size(0) && positions.scalar_type() == torch::kLong,
                "positions: int64 [rows]");
    const size_t batch = keys.size();
    TORCH_CHECK(batch > 0 && values.size() == batch && slot_starts.size() == batch && visible.size() == batch &&
                row_bounds.size() == batch + 1 && row_bounds[0] == 0 && row_bounds[batch] == x.size(0),
                "per sequence: keys, values, a first slot, a mask; and row bounds from 0 to the rows");
    const torch::Tensor positions_c = positions.contiguous();
    const int64_t* pos = positions_c.data_ptr<int64_t>();
    for (int64_t r = 0; r < x.size(0); ++r)
      TORCH_CHECK(pos[r] >= 0 && pos[r] < cos_.size(0), "position ", pos[r], " is outside the RoPE table");
    std::vector<Sequence> seqs;
    for (size_t b = 0; b < batch; ++b) {
      const int64_t r0 = row_bounds[b], r1 = row_bounds[b + 1], s0 = slot_starts[b];
      const auto& k = keys[b];
      const auto& v = values[b];
      TORCH_CHECK(r0 <= r1 && s0 >= 0, "row bounds ascend; slots are not negative");
      TORCH_CHECK(k.dim() == 4 && k.size(0) == (int64_t)layers_.size() && k.size(1) == kv_heads_ && k.size(3) == dim_ &&
                  k.stride(3) == 1 && v.sizes() == k.sizes() && v.stride(3) == 1 && k.scalar_type() == dtype_ &&
                  v.scalar_type() == dtype_, "keys/values [layers, kv_heads, capacity, head_dim] of the pass's dtype");
      TORCH_CHECK(s0 + (r1 - r0) <= k.size(2), "the cache has ", k.size(2), " slots; the pass needs ", s0 + (r1 - r0));
      const bool* mp = nullptr;
      int64_t m_row = 0;
      if (visible[b].has_value()) {
        const auto& m = *visible[b];
        TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 2 && m.size(0) == r1 - r0 &&
                    m.size(1) == s0 + (r1 - r0) && m.stride(1) == 1, "visible: bool [rows, slots seen]");
        mp = m.data_ptr<bool>();
        m_row = m.stride(0);
      }
      seqs.push_back({r0, r1, s0, k, v, mp, m_row});
    }
    if (dtype_ == torch::kBFloat16) return run<at::BFloat16>(x, pos, seqs);
    return run<float>(x, pos, seqs);
  }

 private:
  template <class T>
  torch::Tensor run(const torch::Tensor& x_in, const int64_t* pos, const std::vector<Sequence>& seqs) const {
    const int64_t rows = x_in.size(0), q_size = heads_ * dim_;
    const int64_t qkv_width = q_size + 2 * kv_heads_ * dim_;
    const auto opts = x_in.options();
    torch::Tensor x = x_in.contiguous().clone();
    torch::Tensor h = torch::empty({rows, hidden_}, opts), out = torch::empty({rows, hidden_}, opts);
    torch::Tensor qkv = torch::empty({rows, qkv_width}, opts), q = torch::empty({rows, q_size}, opts);
    torch::Tensor attn = torch::empty({rows, q_size}, opts);
    torch::Tensor gate_up = torch::empty({rows, 2 * intermediate_}, opts), act = torch::empty({rows, intermediate_}, opts);
    T* xp = x.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    T* outp = out.data_ptr<T>();
    T* qkvp = qkv.data_ptr<T>();
    T* qp = q.data_ptr<T>();
    T* attnp = attn.data_ptr<T>();
    T* gup = gate_up.data_ptr<T>();
    T* actp = act.data_ptr<T>();
    for (size_t layer = 0; layer < layers_.size(); ++layer) {
      const Layer& w = layers_[layer];
      esp::rms_norm_rows(xp, w.input_norm.data_ptr<T>(), rows, hidden_, eps_, hp);
      w.qkv(hp, rows, qkvp);
      for (const Sequence& s : seqs) rope_and_store<T>(qkvp, qkv_width, pos, s, (int64_t)layer, qp);
      for (const Sequence& s : seqs) {
        const T* kp = s.keys.data_ptr<T>() + layer * s.keys.stride(0);
        const T* vp = s.values.data_ptr<T>() + layer * s.values.stride(0);
        const int64_t n = s.row1 - s.row0;
        if (n == 0) continue;
        esp::attend_rows(esp::AttendArgs<T>{qp + s.row0 * q_size, n, heads_, dim_, kp, vp, kv_heads_, s.slot0 + n,
                                            s.keys.stride(1), s.keys.stride(2), s.values.stride(1), s.values.stride(2),
                                            s.visible, s.visible_row, scale_, attnp + s.row0 * q_size});
      }
      w.o(attnp, rows, outp);
      add_into<T>(xp, outp, rows * hidden_);
      esp::rms_norm_rows(xp, w.post_norm.data_ptr<T>(), rows, hidden_, eps_, hp);
      w.gate_up(hp, rows, gup);
      esp::silu_mul_rows(gup, 2 * intermediate_, rows, intermediate_, actp);
      w.down(actp, rows, outp);
      add_into<T>(xp, outp, rows * hidden_);
    }
    return x;
  }

  // x += y, rounded to the dtype as torch's add is.
  template <class T>
  static void add_into(T* x, const T* y, int64_t n) {
    at::parallel_for(0, (n + kLanes - 1) / kLanes, 2048, [&](int64_t first, int64_t last) {
      for (int64_t i = first * kLanes; i < std::min(n, last * kLanes); i += kLanes) {
        const vf s = esp::add_rounded(esp::load16(x + i, n - i), esp::load16(y + i, n - i));
        esp::store16(x + i, s, n - i);
      }
    });
  }

  // The sequence's rows of q and k rotated (x cos + flip(halves of x) sin_signed, each product and
  // the sum rounded to the dtype, as model._rope's three ops are): q into `q`, k and v into their
  // cache slots.
  template <class T>
  void rope_and_store(const T* qkv, int64_t qkv_width, const int64_t* pos, const Sequence& s, int64_t layer,
                      T* q) const {
    const int64_t half = dim_ / 2, q_size = heads_ * dim_, kv_size = kv_heads_ * dim_;
    T* kbase = s.keys.data_ptr<T>() + layer * s.keys.stride(0);
    T* vbase = s.values.data_ptr<T>() + layer * s.values.stride(0);
    const int64_t k_head = s.keys.stride(1), k_slot = s.keys.stride(2);
    const int64_t v_head = s.values.stride(1), v_slot = s.values.stride(2);
    const T* cos = cos_.data_ptr<T>();
    const T* sin = sin_.data_ptr<T>();
    at::parallel_for(s.row0, s.row1, 16, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t slot = s.slot0 + (r - s.row0);
        const T* c = cos + pos[r] * dim_;
        const T* sn = sin + pos[r] * dim_;
        const T* row = qkv + r * qkv_width;
        for (int64_t hh = 0; hh < heads_ + kv_heads_; ++hh) {
          const T* src = row + hh * dim_;
          T* dst = hh < heads_ ? q + r * q_size + hh * dim_ : kbase + (hh - heads_) * k_head + slot * k_slot;
          for (int64_t i = 0; i < dim_; i += kLanes) {
            const int64_t j = i < half ? i + half : i - half;
            const vf a = as_stored(esp::mul_rounded(esp::load16(src + i), esp::load16(c + i)), dst);
            const vf b = as_stored(esp::mul_rounded(esp::load16(src + j), esp::load16(sn + i)), dst);
            esp::store16(dst + i, esp::add_rounded(a, b));
          }
        }
        const T* vsrc = row + q_size + kv_size;
        for (int64_t kvh = 0; kvh < kv_heads_; ++kvh)
          std::memcpy(vbase + kvh * v_head + slot * v_slot, vsrc + kvh * dim_, dim_ * sizeof(T));
      }
    });
  }

  int64_t hidden_, heads_, kv_heads_, dim_, intermediate_;
  float eps_, scale_;
  torch::Tensor cos_, sin_;
  c10::ScalarType dtype_;
  std::vector<Layer> layers_;
};

}  // namespace

void bind_decoder(pybind11::module& m) {
  pybind11::class_<CpuDecoder>(m, "CpuDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, torch::Tensor, torch::Tensor,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<LinearSpec>,
                          std::vector<LinearSpec>, std::vector<LinearSpec>, std::vector<LinearSpec>>())
      .def("forward", &CpuDecoder::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "the layers over rows x at positions, keys/values stored into each sequence's cache");
}
