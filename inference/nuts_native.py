"""``nuts_loop.transition`` written once more in C++: the loops over doublings and leaves run
over plain arrays, with every buffer allocated once per transition, and call the
potential's own compiled program once per batched leaf: the AOTInductor library (``.so``) or
package (``.pt2``: one carrying a proxy executor for ATen ops without a C shim, e.g. the GP's
Cholesky) that ``inference.compiled.build_native`` built for the potential's graph (log density,
gradient, parameters valid?), whose outputs it maps as ``hmc.evaluate`` does (a non-finite log
density is -inf, a non-finite gradient entry 0, both float64) -- so the transition needs no
compile of its own where the potential is compiled natively.

Why: the same loops as a ``while_loop`` compiled by AOTInductor allocate every carried
and intermediate tensor anew at every leaf and run fused kernels on tiny masked vectors;
on eight schools (4 chains, 10 dimensions) most of a leaf's time went to malloc/free and
tensor handles. Here a leaf costs one call of the potential's library plus a few hundred
floating-point operations. A library whose buffers are all on the C stack is called through
its minimal ArrayRef entry point (``compiled._buffer_options``): array descriptors in, the
library's own per-thread output arrays out, no tensor made per call (logistic regression's
sampling phase 66 -> 53 ms; ``PPL_NATIVE_ARRAYREF=0``: the container's ``run``, the same numbers).

The C++ is built once per machine, source version and compiler flags (``compiler_flags``)
with ``torch.utils.cpp_extension`` (no Python module: a ``torch.ops.ppl_nuts.transition``
operator), into the torch extensions directory; later processes load the built library in milliseconds.

``transitions_native`` makes NUTS's sampling phase (fixed step size, diagonal metric), and
``warmup_native`` its warm-up between the ends of slow windows (the step size's dual averaging
and the Welford estimate done there in the numpy code's IEEE operations and order), in runs
of transitions without Python between them: each transition's momentum and uniforms are drawn
in C++ from the run's generator, by the same ATen calls in the same order as ``hmc.nuts_step``
and ``nuts_loop.CompiledTransition`` make them, so the draws are the same bit for bit
(``tests/test_nuts_loop.py``); ~20 us of Python a transition less in sampling, ~50 in warm-up
(eight schools 4 x 1000 + 1000: warm-up 117 -> 69 ms, sampling 74 -> 52 ms).

Contract (``transition_native``): the same inputs and outputs as ``nuts_loop.transition``
(``evaluate_at`` being the library's program), the same arithmetic in the same order up
to the summation order of inner products: ``nuts_loop.CompiledTransition`` checks it
against ``nuts_loop.transition`` run eagerly before it is used.
"""
from __future__ import annotations

import hashlib
import os

import torch

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <torch/library.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>
#include <torch/csrc/inductor/aoti_runtime/interface.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr double MAX_DELTA_ENERGY = 1000.0;
constexpr double INF = std::numeric_limits<double>::infinity();

// A library's minimal ArrayRef entry point (``compiled._buffer_options`` builds a library whose
// buffers are all on the C stack with it): called with descriptors of the caller's arrays, the
// library writes its outputs to arrays of its own, one set per thread, and describes them; no
// tensor is made or freed per call, which the container's ``run`` does for every input and
// output (~1.5 us of a ~8 us call on logistic regression). One model instance, behind a lock.
using CreateModel = AOTIRuntimeError (*)(AOTInductorModelHandle*, const AOTInductorConstantMapEntry*, size_t);
using RunArrayRef = AOTIRuntimeError (*)(AOTInductorModelHandle, int32_t, const AOTInductorArrayRefTensor*, int32_t,
                                         AOTInductorArrayRefTensor*);
struct ArrayRefEntry {
  AOTInductorModelHandle model = nullptr;
  RunArrayRef run = nullptr;
  std::mutex lock;
};

// whether calls go through the ArrayRef entry point where a library has one (``use_arrayref``;
// ``PPL_NATIVE_ARRAYREF=0`` turns it off: nuts_native.load)
std::atomic<bool> arrayref_on{true};
std::atomic<int64_t> arrayref_calls{0};  // calls made through it (``arrayref_calls``: tests)

std::unique_ptr<ArrayRefEntry> arrayref_entry(const std::string& path) {
  void* dso = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // (the runner has it open: the same handle)
  if (dso == nullptr) return nullptr;
  auto create = reinterpret_cast<CreateModel>(dlsym(dso, "AOTInductorModelCreateV2"));
  auto run = reinterpret_cast<RunArrayRef>(dlsym(dso, "AOTInductorModelRunMinimalArrayrefInterfaceV2"));
  auto entry = std::make_unique<ArrayRefEntry>();
  if (create == nullptr || run == nullptr || create(&entry->model, nullptr, 0) != AOTI_RUNTIME_SUCCESS) {
    dlclose(dso);
    return nullptr;
  }
  entry->run = run;
  return entry;  // (the library stays open for the process, as the runner's)
}

// The potential's compiled program: an AOTInductor shared library (.so), or an AOTInductor
// package (.pt2: a library with a proxy executor for ATen ops without a C shim, e.g. a Cholesky).
struct Program {
  std::unique_ptr<torch::inductor::AOTIModelContainerRunnerCpu> library;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  torch::inductor::AOTIModelContainerRunner* runner = nullptr;
  std::unique_ptr<ArrayRefEntry> arrayref;  // a library's ArrayRef entry point, where it has one
};

Program& program_for(const std::string& path) {
  static std::mutex lock;
  static std::unordered_map<std::string, std::unique_ptr<Program>> programs;
  std::lock_guard<std::mutex> guard(lock);
  auto& slot = programs[path];
  if (!slot) {
    auto program = std::make_unique<Program>();
    if (path.size() > 4 && path.compare(path.size() - 4, 4, ".pt2") == 0) {
      program->package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
      program->runner = program->package->get_runner();
    } else {
      program->library = std::make_unique<torch::inductor::AOTIModelContainerRunnerCpu>(path, 1);
      program->runner = program->library.get();
      program->arrayref = arrayref_entry(path);
    }
    slot = std::move(program);
  }
  return *slot;
}

AOTInductorArrayRefTensor describe(const at::Tensor& t) {
  AOTInductorArrayRefTensor d;
  std::memset(&d, 0, sizeof d);
  TORCH_CHECK(t.dim() <= AOTI_ARRAYREF_TENSOR_MAX_DIMS && t.is_contiguous(), "an input the library cannot take");
  d.data = t.data_ptr();
  d.numel = t.numel();
  d.ndim = int32_t(t.dim());
  for (int64_t k = 0; k < t.dim(); ++k) d.sizes[k] = t.size(k), d.strides[k] = t.stride(k);
  d.dtype = int32_t(t.scalar_type());  // (aoti_torch_dtype_* are the ScalarType codes)
  d.device_type = int32_t(c10::DeviceType::CPU);
  d.device_idx = -1;
  return d;
}

// The potential evaluated on ``inputs`` (z first, its buffer rewritten before each call): its log
// density [C] and gradient [C, D] as float64 arrays and the parameters' validity flag, through
// the library's ArrayRef entry point where it has one and its outputs are those (else, and after
// any failure there, through the runner: the same program, the same numbers).
struct Evaluation {
  Program& program;
  const std::vector<at::Tensor>& inputs;
  int64_t C, CD;
  bool direct;
  std::vector<AOTInductorArrayRefTensor> described;
  AOTInductorArrayRefTensor outs[3];
  at::Tensor logp_t, grad_t;  // the runner's outputs, alive while read

  Evaluation(Program& program, const std::vector<at::Tensor>& inputs, int64_t C, int64_t CD)
      : program(program), inputs(inputs), C(C), CD(CD), direct(program.arrayref != nullptr && arrayref_on.load()) {
    if (direct)
      for (const auto& t : inputs) described.push_back(describe(t));
  }

  bool call_direct(const double*& logp, const double*& grad, bool& ok) {
    auto& entry = *program.arrayref;
    std::lock_guard<std::mutex> guard(entry.lock);
    if (entry.run(entry.model, int32_t(described.size()), described.data(), 3, outs) != AOTI_RUNTIME_SUCCESS)
      return false;
    if (outs[0].dtype != int32_t(at::kDouble) || outs[0].numel != C || outs[1].dtype != int32_t(at::kDouble) ||
        outs[1].numel != CD || outs[2].dtype != int32_t(at::kBool) || outs[2].numel != 1)
      return false;
    arrayref_calls.fetch_add(1, std::memory_order_relaxed);
    logp = static_cast<const double*>(outs[0].data);
    grad = static_cast<const double*>(outs[1].data);
    ok = *static_cast<const bool*>(outs[2].data);
    return true;
  }

  void operator()(const double*& logp, const double*& grad, bool& ok) {
    if (direct && call_direct(logp, grad, ok)) return;
    direct = false;
    auto out = program.runner->run(inputs);
    logp_t = out[0], grad_t = out[1];
    if (logp_t.scalar_type() != at::kDouble) logp_t = logp_t.to(at::kDouble);
    if (grad_t.scalar_type() != at::kDouble) grad_t = grad_t.to(at::kDouble);
    logp_t = logp_t.contiguous();
    grad_t = grad_t.contiguous();
    TORCH_CHECK(logp_t.numel() == C && grad_t.numel() == CD, "the potential's outputs have other shapes");
    TORCH_CHECK(out[2].scalar_type() == at::kBool && out[2].numel() == 1, "the potential's validity flag");
    logp = logp_t.data_ptr<double>();
    grad = grad_t.data_ptr<double>();
    ok = *out[2].data_ptr<bool>();  // (not item(): no dispatch per leaf)
  }
};

bool use_arrayref(bool on) { return arrayref_on.exchange(on); }
int64_t calls_through_arrayref() { return arrayref_calls.load(); }

// hmc.evaluate's mapping of the potential's outputs: a non-finite log density is -inf (density
// zero: rejected), a non-finite gradient entry is 0
double finite_logp(double x) { return std::isfinite(x) ? x : -INF; }
double finite_grad(double x) { return std::isfinite(x) ? x : 0.0; }

double logaddexp(double a, double b) {  // torch.logaddexp
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  if (std::isinf(a) && a == b) return a;
  double m = a > b ? a : b;
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

double nan_to_neg_inf(double x) {  // torch.nan_to_num(x, nan=-inf)
  if (std::isnan(x)) return -INF;
  if (x == INF) return std::numeric_limits<double>::max();
  if (x == -INF) return std::numeric_limits<double>::lowest();
  return x;
}

// an uninitialised contiguous CPU tensor, allocated without the dispatcher
at::Tensor uninitialised(at::IntArrayRef size, at::ScalarType dtype) { return at::Tensor(at::detail::empty_cpu(size, dtype)); }

struct Shape {
  int64_t C, D;
  bool dense;
  const double* inv;  // [C, D] or [C, D, D]
  // v = M^-1 p for chain c (D values)
  void velocity(int64_t c, const double* p, double* v) const {
    if (dense) {
      const double* m = inv + c * D * D;
      for (int64_t i = 0; i < D; ++i) {
        double s = 0.0;
        for (int64_t j = 0; j < D; ++j) s += m[i * D + j] * p[j];
        v[i] = s;
      }
    } else {
      const double* m = inv + c * D;
      for (int64_t i = 0; i < D; ++i) v[i] = m[i] * p[i];
    }
  }
};

double dot(const double* a, const double* b, int64_t D) {
  double s = 0.0;
  for (int64_t i = 0; i < D; ++i) s += a[i] * b[i];
  return s;
}

// hmc._merged_no_uturn for one chain: the six inner products (scratch: 2 x D)
bool merged_no_uturn(const double* a_far_v, const double* a_near_v, const double* a_near_p, const double* rho_a,
                     const double* b_near_v, const double* b_near_p, const double* b_far_v, const double* rho_b,
                     const double* whole, int64_t D, double* scratch) {
  double* a_ext = scratch;
  double* b_ext = scratch + D;
  for (int64_t i = 0; i < D; ++i) {
    a_ext[i] = rho_a[i] + b_near_p[i];
    b_ext[i] = rho_b[i] + a_near_p[i];
  }
  return dot(a_far_v, whole, D) > 0 && dot(b_far_v, whole, D) > 0 && dot(a_far_v, a_ext, D) > 0 &&
         dot(b_near_v, a_ext, D) > 0 && dot(a_near_v, b_ext, D) > 0 && dot(b_far_v, b_ext, D) > 0;
}

std::vector<at::Tensor> transition(const std::string& library, const at::Tensor& z_in, const at::Tensor& logp_in,
                                   const at::Tensor& grad_in, const at::Tensor& p0_in, const at::Tensor& u_in,
                                   const at::Tensor& u_leaf_in, const at::Tensor& step_in,
                                   const at::Tensor& inv_mass_in, int64_t fresh, int64_t K,
                                   at::TensorList args) {
  auto& program = program_for(library);
  const int64_t C = z_in.size(0), D = z_in.size(1), L = u_leaf_in.size(0);
  auto z0 = z_in.contiguous(), logp0 = logp_in.contiguous(), grad0 = grad_in.contiguous(),
       p0t = p0_in.contiguous(), ut = u_in.contiguous(), ult = u_leaf_in.contiguous(),
       stept = step_in.contiguous(), invt = inv_mass_in.contiguous();
  const double *zs = z0.data_ptr<double>(), *lps = logp0.data_ptr<double>(), *gs = grad0.data_ptr<double>(),
               *p0 = p0t.data_ptr<double>(), *u = ut.data_ptr<double>(), *u_leaf = ult.data_ptr<double>(),
               *step = stept.data_ptr<double>();
  Shape shape{C, D, invt.dim() == 3, invt.data_ptr<double>()};
  const int64_t CD = C * D;

  // outputs and state
  // (fresh CPU tensors without the dispatcher: a zeros, ones or clone through it cost ~1 us each,
  // ~10% of a short transition; every element is written below)
  auto pz_t = uninitialised({C, D}, at::kDouble), pg_t = uninitialised({C, D}, at::kDouble),
       plp_t = uninitialised({C}, at::kDouble);
  std::copy(zs, zs + C * D, pz_t.data_ptr<double>());
  std::copy(gs, gs + C * D, pg_t.data_ptr<double>());
  std::copy(lps, lps + C, plp_t.data_ptr<double>());
  auto energy_t = uninitialised({C}, at::kDouble), accept_t = uninitialised({C}, at::kDouble);
  auto div_t = uninitialised({C}, at::kBool), moved_t = uninitialised({C}, at::kBool);
  auto steps_t = uninitialised({C}, at::kLong), depth_t = uninitialised({C}, at::kLong);
  auto flags_t = uninitialised({2}, at::kBool);
  double *pz = pz_t.data_ptr<double>(), *pg = pg_t.data_ptr<double>(), *plp = plp_t.data_ptr<double>();
  std::vector<double> H0(C), log_w(C, 0.0), pw(C, 0.0), acc(C, 0.0), steps(C, 0.0), depth(C, 0.0);
  std::vector<char> moved(C, 0), active(C, 1), div(C, 0), go_right(K * C);
  std::vector<double> rho(p0, p0 + CD);
  // ends[c][side][4][D]: z, p, grad, v of the left (0) and right (1) end
  std::vector<double> ends(C * 2 * 4 * D);
  auto end_at = [&](int64_t c, int64_t side, int64_t what) { return ends.data() + ((c * 2 + side) * 4 + what) * D; };
  std::vector<double> v0(D);
  for (int64_t c = 0; c < C; ++c) {
    shape.velocity(c, p0 + c * D, v0.data());
    H0[c] = 0.5 * dot(p0 + c * D, v0.data(), D) - lps[c];
    for (int64_t side = 0; side < 2; ++side) {
      std::copy(zs + c * D, zs + (c + 1) * D, end_at(c, side, 0));
      std::copy(p0 + c * D, p0 + (c + 1) * D, end_at(c, side, 1));
      std::copy(gs + c * D, gs + (c + 1) * D, end_at(c, side, 2));
      std::copy(v0.begin(), v0.end(), end_at(c, side, 3));
    }
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) go_right[k * C + c] = u[k * C + c] < 0.5;
  bool flag_valid = true, flag_enough = true;

  // the leaf loop's buffers
  std::vector<double> zc(CD), pc(CD), gc(CD), vc(CD), rho_s(CD), cz(CD), cg(CD);
  std::vector<double> checks(K * 5 * CD);  // [K, 5 (v, p, v before, p before, rho before), C, D]
  auto check_at_ = [&](int64_t k, int64_t what, int64_t c) { return checks.data() + ((k * 5 + what) * C + c) * D; };
  std::vector<double> lw_s(C), clp(C), cw(C), eps(C), half(C);
  std::vector<char> building(C), right(C), ok(C);
  std::vector<double> p(D), v1(CD), p1(CD), scratch(2 * D), whole(D), rho_a(D), rho_bb(D);
  std::vector<double> p_near(CD), v_near(CD);
  auto z1_t = uninitialised({C, D}, at::kDouble);
  double* z1 = z1_t.data_ptr<double>();
  std::vector<at::Tensor> inputs;
  inputs.reserve(1 + args.size());
  inputs.push_back(z1_t);
  for (const auto& a : args) inputs.push_back(a.contiguous());
  std::vector<double> logp1(C), g1(CD);  // the potential's outputs at the leaf, mapped (finite_logp, finite_grad)
  Evaluation evaluate(program, inputs, C, CD);

  for (int64_t d = 0; d < K; ++d) {
    bool any_active = false;
    for (int64_t c = 0; c < C; ++c) any_active |= active[c];
    if (!(any_active && flag_valid && flag_enough)) break;
    for (int64_t c = 0; c < C; ++c) {
      depth[c] += active[c] ? 1.0 : 0.0;
      right[c] = go_right[d * C + c];
      double s = (right[c] ? 1.0 : -1.0) * step[c];
      eps[c] = s;
      half[c] = 0.5 * s;
      std::copy(end_at(c, right[c], 0), end_at(c, right[c], 0) + D, zc.data() + c * D);
      std::copy(end_at(c, right[c], 1), end_at(c, right[c], 1) + D, pc.data() + c * D);
      std::copy(end_at(c, right[c], 2), end_at(c, right[c], 2) + D, gc.data() + c * D);
      std::copy(end_at(c, right[c], 3), end_at(c, right[c], 3) + D, vc.data() + c * D);
      building[c] = active[c];
      lw_s[c] = -INF;
      clp[c] = 0.0;
      cw[c] = 0.0;
    }
    std::fill(rho_s.begin(), rho_s.end(), 0.0);
    std::copy(zc.begin(), zc.end(), cz.begin());
    std::copy(gc.begin(), gc.end(), cg.begin());
    std::fill(checks.begin(), checks.end(), 0.0);
    // the near end (for the merged U-turn checks)
    std::copy(pc.begin(), pc.end(), p_near.begin());
    std::copy(vc.begin(), vc.end(), v_near.begin());
    const int64_t n_leaves = int64_t(1) << d;
    int64_t n = 0;
    while (true) {
      bool any_building = false;
      for (int64_t c = 0; c < C; ++c) any_building |= building[c];
      if (!(n < n_leaves && any_building && flag_valid && flag_enough)) break;
      for (int64_t c = 0; c < C; ++c) {
        double* pcc = pc.data() + c * D;
        for (int64_t i = 0; i < D; ++i) p[i] = pcc[i] + half[c] * gc[c * D + i];
        shape.velocity(c, p.data(), v1.data() + c * D);
        for (int64_t i = 0; i < D; ++i) {
          // (a chain that has stopped building is evaluated where it stopped: nuts_loop.transition)
          z1[c * D + i] = building[c] ? zc[c * D + i] + eps[c] * v1[c * D + i] : zc[c * D + i];
          p1[c * D + i] = p[i];
        }
      }
      const double *logp1_raw = nullptr, *g1_raw = nullptr;
      bool ok_par = false;
      evaluate(logp1_raw, g1_raw, ok_par);
      for (int64_t c = 0; c < C; ++c) logp1[c] = finite_logp(logp1_raw[c]);
      for (int64_t i = 0; i < CD; ++i) g1[i] = finite_grad(g1_raw[i]);
      bool any_building_after = false;
      for (int64_t c = 0; c < C; ++c) {
        double* p1c = p1.data() + c * D;
        double* v1c = v1.data() + c * D;
        const double* g1c = g1.data() + c * D;
        for (int64_t i = 0; i < D; ++i) p1c[i] = p1c[i] + half[c] * g1c[i];
        shape.velocity(c, p1c, v1c);
        double w1 = (logp1[c] + H0[c]) - 0.5 * dot(p1c, v1c, D);
        bool okc = w1 >= -MAX_DELTA_ENERGY;
        w1 = nan_to_neg_inf(w1);
        if (building[c]) {
          acc[c] += std::exp(w1 < 0.0 ? w1 : 0.0);
          steps[c] += 1.0;
          if (w1 < -MAX_DELTA_ENERGY) div[c] = 1;
        }
        // the U-turn checks of the blocks of 2^k leaves that start / end here
        double* rsc = rho_s.data() + c * D;
        for (int64_t k = 0; k <= d && k < K; ++k) {
          if (n % (int64_t(1) << k) != 0) continue;
          std::copy(v1c, v1c + D, check_at_(k, 0, c));
          std::copy(p1c, p1c + D, check_at_(k, 1, c));
          std::copy(vc.data() + c * D, vc.data() + (c + 1) * D, check_at_(k, 2, c));
          std::copy(pc.data() + c * D, pc.data() + (c + 1) * D, check_at_(k, 3, c));
          std::copy(rsc, rsc + D, check_at_(k, 4, c));
        }
        for (int64_t i = 0; i < D; ++i) rsc[i] += p1c[i];
        for (int64_t k = 1; k <= d && k < K; ++k) {
          if ((n + 1) % (int64_t(1) << k) != 0) continue;
          const double *vm = check_at_(k - 1, 0, c), *pm = check_at_(k - 1, 1, c), *vmp = check_at_(k - 1, 2, c),
                       *pmp = check_at_(k - 1, 3, c), *rho_m = check_at_(k - 1, 4, c);
          const double *vb = check_at_(k, 0, c), *rho_b = check_at_(k, 4, c);
          for (int64_t i = 0; i < D; ++i) {
            rho_a[i] = rho_m[i] - rho_b[i];
            rho_bb[i] = rsc[i] - rho_m[i];
            whole[i] = rsc[i] - rho_b[i];
          }
          if (!merged_no_uturn(vb, vmp, pmp, rho_a.data(), vm, pm, v1c, rho_bb.data(), whole.data(), D,
                               scratch.data()))
            okc = false;
        }
        // progressive choice within the sub-tree
        double lw_new = logaddexp(lw_s[c], w1);
        double u_n = u_leaf[std::min(n, L - 1) * C + c];
        bool take = (n == 0) || (u_n < std::exp(w1 - lw_new));
        if (take) {
          std::copy(z1 + c * D, z1 + (c + 1) * D, cz.data() + c * D);
          std::copy(g1c, g1c + D, cg.data() + c * D);
          clp[c] = logp1[c];
          cw[c] = w1;
        }
        lw_s[c] = lw_new;
        building[c] = building[c] && okc;
        if (building[c]) {
          std::copy(z1 + c * D, z1 + (c + 1) * D, zc.data() + c * D);
          std::copy(p1c, p1c + D, pc.data() + c * D);
        }
        std::copy(g1c, g1c + D, gc.data() + c * D);
        std::copy(v1c, v1c + D, vc.data() + c * D);
        any_building_after |= building[c];
      }
      flag_enough = flag_enough && ((n + 1 >= n_leaves) || (n + 1 < fresh) || !any_building_after);
      flag_valid = flag_valid && ok_par;
      ++n;
    }
    // the biased progressive choice at the top level and the merged U-turn checks (hmc._merge)
    for (int64_t c = 0; c < C; ++c) {
      bool valid = building[c] && n >= n_leaves;
      const double *v_first = check_at_(d, 0, c), *p_first = check_at_(d, 1, c);
      bool take = valid && (u[(2 * K + d) * C + c] < std::exp(lw_s[c] - log_w[c]));
      if (take) {
        std::copy(cz.data() + c * D, cz.data() + (c + 1) * D, pz + c * D);
        std::copy(cg.data() + c * D, cg.data() + (c + 1) * D, pg + c * D);
        plp[c] = clp[c];
        pw[c] = cw[c];
        moved[c] = 1;
      }
      if (valid) log_w[c] = logaddexp(log_w[c], lw_s[c]);
      double* rc = rho.data() + c * D;
      const double* rsc = rho_s.data() + c * D;
      for (int64_t i = 0; i < D; ++i) whole[i] = rc[i] + rsc[i];
      const double* far_v = end_at(c, right[c] ? 0 : 1, 3);
      bool okc = merged_no_uturn(far_v, v_near.data() + c * D, p_near.data() + c * D, rc, v_first, p_first,
                                 vc.data() + c * D, rsc, whole.data(), D, scratch.data());
      if (valid) {
        std::copy(whole.begin(), whole.end(), rc);
        int64_t side = right[c] ? 1 : 0;
        std::copy(zc.data() + c * D, zc.data() + (c + 1) * D, end_at(c, side, 0));
        std::copy(pc.data() + c * D, pc.data() + (c + 1) * D, end_at(c, side, 1));
        std::copy(gc.data() + c * D, gc.data() + (c + 1) * D, end_at(c, side, 2));
        std::copy(vc.data() + c * D, vc.data() + (c + 1) * D, end_at(c, side, 3));
      }
      active[c] = valid && okc;
    }
  }
  double* energy = energy_t.data_ptr<double>();
  double* accept = accept_t.data_ptr<double>();
  bool* divs = div_t.data_ptr<bool>();
  bool* moveds = moved_t.data_ptr<bool>();
  int64_t* stepss = steps_t.data_ptr<int64_t>();
  int64_t* depths = depth_t.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    energy[c] = H0[c] - pw[c];
    accept[c] = acc[c] / (steps[c] < 1.0 ? 1.0 : steps[c]);
    divs[c] = div[c];
    moveds[c] = moved[c];
    stepss[c] = int64_t(steps[c]);
    depths[c] = int64_t(depth[c]);
  }
  bool* flags = flags_t.data_ptr<bool>();
  flags[0] = flag_valid;
  flags[1] = flag_enough;
  return {pz_t, plp_t, pg_t, energy_t, accept_t, div_t, steps_t, depth_t, moved_t, flags_t};
}

// One transition after another as ``hmc.nuts_step`` and ``nuts_loop.CompiledTransition`` make them,
// drawing what they draw, in the same order, from the same generator: the momentum (randn [C, D]
// times sqrt_mass), the uniforms (one uniform_ on the first 3KC + fresh*C numbers of ``uniforms``:
// u read as [C, 3K], then the leaf uniforms), and where a sub-tree outgrows the leaf uniforms
// drawn, the rest (rand [L - fresh, C]) and the transition again. ``recent``: the deepest tree of
// each recent transition (``CompiledTransition.recent_depths``, at most 50 kept).
struct Runs {
  const std::string& library;
  const at::Tensor &inv_mass, &uniforms;
  std::optional<at::Generator> gen;
  int64_t C, D, K, L;
  at::TensorList args;
  std::vector<int64_t> recent;
  at::Tensor sqrt_m, p0, u, u_leaf;
  int64_t redone = 0;

  Runs(const std::string& library, const at::Tensor& z, const at::Tensor& sqrt_mass, const at::Tensor& inv_mass,
       const at::Tensor& uniforms, std::optional<at::Generator> gen, int64_t K, at::IntArrayRef recent,
       at::TensorList args)
      : library(library), inv_mass(inv_mass), uniforms(uniforms), gen(std::move(gen)), C(z.size(0)), D(z.size(1)),
        K(K), L(int64_t(1) << (K - 1)), args(args), recent(recent.begin(), recent.end()) {
    TORCH_CHECK(uniforms.numel() == 3 * K * C + L * C && uniforms.is_contiguous(), "the uniforms' buffer");
    sqrt_m = sqrt_mass.contiguous();
    p0 = uninitialised({C, D}, at::kDouble);
    u = uninitialised({3 * K, C}, at::kDouble);
    u_leaf = uniforms.narrow(0, 3 * K * C, L * C).view({L, C});
  }

  // the next transition's outputs (as ``transition``'s), or none where it is not valid (the
  // eager kernel must make it with ``p0`` and ``u``)
  std::optional<std::vector<at::Tensor>> next(const at::Tensor& z, const at::Tensor& logp, const at::Tensor& grad,
                                              const at::Tensor& step) {
    const auto f64 = z.options().dtype(at::kDouble);
    {
      auto eps = at::randn({C, D}, gen, f64);
      const double *e = eps.data_ptr<double>(), *m = sqrt_m.data_ptr<double>();
      double* out = p0.data_ptr<double>();
      for (int64_t i = 0; i < C * D; ++i) out[i] = e[i] * m[i];
    }
    int64_t deepest = K;
    if (!recent.empty()) deepest = *std::max_element(recent.begin(), recent.end());
    const int64_t fresh = std::min(L, int64_t(1) << deepest);
    uniforms.narrow(0, 0, 3 * K * C + fresh * C).uniform_(0.0, 1.0, gen);
    {
      const double* uni = uniforms.data_ptr<double>();
      double* ut = u.data_ptr<double>();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < 3 * K; ++k) ut[k * C + c] = uni[c * 3 * K + k];
    }
    auto out = transition(library, z, logp, grad, p0, u, u_leaf, step, inv_mass, fresh, K, args);
    bool valid = out[9].data_ptr<bool>()[0], enough = out[9].data_ptr<bool>()[1];
    if (valid && !enough) {
      ++redone;
      u_leaf.narrow(0, fresh, L - fresh).copy_(at::rand({L - fresh, C}, gen, f64));
      out = transition(library, z, logp, grad, p0, u, u_leaf, step, inv_mass, L, K, args);
      valid = out[9].data_ptr<bool>()[0];
      enough = out[9].data_ptr<bool>()[1];
    }
    if (!(valid && enough)) return std::nullopt;
    const int64_t* depth = out[7].data_ptr<int64_t>();
    recent.push_back(*std::max_element(depth, depth + C));
    if (recent.size() > 50) recent.erase(recent.begin());
    return out;
  }

  at::Tensor recent_depths() const {
    auto t = uninitialised({int64_t(recent.size())}, at::kLong);
    std::copy(recent.begin(), recent.end(), t.data_ptr<int64_t>());
    return t;
  }
};

// ``n`` transitions in a row with a fixed step size and diagonal metric (NUTS's sampling phase),
// each made by ``Runs::next``; stops early at one that is not valid. Returns {done, redone; z, logp,
// grad (the state after the last transition done); the done transitions' z [n, C, D], logp,
// energy, accept [n, C], divergent, moved [n, C] (bool), steps, depth [n, C] (int64); the recent
// depths; the failed transition's p0 and u}.
std::vector<at::Tensor> transitions(const std::string& library, const at::Tensor& z_in, const at::Tensor& logp_in,
                                    const at::Tensor& grad_in, const at::Tensor& sqrt_mass, const at::Tensor& step,
                                    const at::Tensor& inv_mass, const at::Tensor& uniforms,
                                    std::optional<at::Generator> gen, int64_t n, int64_t K,
                                    at::IntArrayRef recent, at::TensorList args) {
  Runs runs(library, z_in, sqrt_mass, inv_mass, uniforms, gen, K, recent, args);
  const int64_t C = runs.C, D = runs.D;
  auto zs = uninitialised({n, C, D}, at::kDouble), logps = uninitialised({n, C}, at::kDouble);
  auto energies = uninitialised({n, C}, at::kDouble), accepts = uninitialised({n, C}, at::kDouble);
  auto divs = uninitialised({n, C}, at::kBool), moveds = uninitialised({n, C}, at::kBool);
  auto stepss = uninitialised({n, C}, at::kLong), depths = uninitialised({n, C}, at::kLong);
  at::Tensor z = z_in, logp = logp_in, grad = grad_in;
  int64_t done = 0;
  auto record = [&](at::Tensor& into, const at::Tensor& from, int64_t size) {  // (the dispatcher's copy_: ~0.5 us)
    std::memcpy(static_cast<char*>(into.data_ptr()) + done * size, from.data_ptr(), size);
  };
  for (; done < n; ++done) {
    auto out = runs.next(z, logp, grad, step);
    if (!out) break;
    z = (*out)[0], logp = (*out)[1], grad = (*out)[2];
    const int64_t cd = C * D * sizeof(double), c8 = C * sizeof(double), cb = C * sizeof(bool);
    record(zs, z, cd), record(logps, logp, c8), record(energies, (*out)[3], c8), record(accepts, (*out)[4], c8);
    record(divs, (*out)[5], cb), record(stepss, (*out)[6], c8), record(depths, (*out)[7], c8);
    record(moveds, (*out)[8], cb);
  }
  auto counts = uninitialised({2}, at::kLong);
  counts.data_ptr<int64_t>()[0] = done;
  counts.data_ptr<int64_t>()[1] = runs.redone;
  auto failed_p0 = done < n ? runs.p0 : uninitialised({0}, at::kDouble);
  auto failed_u = done < n ? runs.u : uninitialised({0}, at::kDouble);
  return {counts, z, logp, grad, zs, logps, energies, accepts, divs, moveds, stepss, depths, runs.recent_depths(),
          failed_p0, failed_u};
}

// ``n`` warm-up iterations in a row (``hmc.sample_nuts``'s, up to and including the next end of a
// slow window): each transition made by ``Runs::next``, then the adaptation ``WindowedAdaptation.update``
// makes, in the same IEEE operations and order as its numpy arrays: dual averaging of the log step
// size (iterates mu, s_bar, x, x_bar [C], updated in place; ``counter``), the step size exp(x) by
// torch's exp, and where ``in_window`` (bool [n]) Welford's running mean and squares (mean, m2
// [C, D], in place; ``welford_n``); divergences are added into ``divergences`` (int64 [C]). The
// window's end itself (the mass matrix, the step size search) is left to the caller. Stops early
// at a transition that is not valid, before its adaptation. Returns {counts (done, redone,
// counter, welford_n), z, logp, grad, step, recent depths, the failed transition's p0 and u}.
std::vector<at::Tensor> warmup(const std::string& library, const at::Tensor& z_in, const at::Tensor& logp_in,
                               const at::Tensor& grad_in, const at::Tensor& sqrt_mass, const at::Tensor& step_in,
                               const at::Tensor& inv_mass, const at::Tensor& uniforms,
                               std::optional<at::Generator> gen, int64_t n, int64_t K, at::IntArrayRef recent,
                               at::TensorList args, const at::Tensor& mu, const at::Tensor& s_bar,
                               const at::Tensor& x, const at::Tensor& x_bar, int64_t counter, double target,
                               double gamma, double t0, double kappa, const at::Tensor& mean, const at::Tensor& m2,
                               int64_t welford_n, const at::Tensor& in_window, const at::Tensor& divergences) {
  Runs runs(library, z_in, sqrt_mass, inv_mass, uniforms, gen, K, recent, args);
  const int64_t C = runs.C, D = runs.D;
  for (const auto* t : {&mu, &s_bar, &x, &x_bar, &mean, &m2})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kDouble, "the adaptation's state");
  TORCH_CHECK(mean.numel() == C * D && m2.numel() == C * D && mu.numel() == C, "the adaptation's shapes");
  constexpr double LARGEST = std::numeric_limits<double>::max();
  at::Tensor z = z_in, logp = logp_in, grad = grad_in, step = step_in;
  double *mu_p = mu.data_ptr<double>(), *sb = s_bar.data_ptr<double>(), *xp = x.data_ptr<double>(),
         *xb = x_bar.data_ptr<double>(), *mean_p = mean.data_ptr<double>(), *m2_p = m2.data_ptr<double>();
  const bool* window = in_window.data_ptr<bool>();
  int64_t* div_count = divergences.data_ptr<int64_t>();
  int64_t done = 0;
  for (; done < n; ++done) {
    auto out = runs.next(z, logp, grad, step);
    if (!out) break;
    z = (*out)[0], logp = (*out)[1], grad = (*out)[2];
    const bool* div = (*out)[5].data_ptr<bool>();
    for (int64_t c = 0; c < C; ++c) div_count[c] += div[c] ? 1 : 0;
    // adaptation.DualAveraging.update
    const double* accept = (*out)[4].data_ptr<double>();
    ++counter;
    const double eta = 1.0 / (double(counter) + t0);
    const double x_eta = std::pow(double(counter), -kappa);
    const double shrink = std::sqrt(double(counter)) / gamma;
    auto next = uninitialised({C}, at::kDouble);
    for (int64_t c = 0; c < C; ++c) {
      double stat = accept[c];
      stat = std::isnan(stat) ? 0.0 : std::min(std::max(stat, -LARGEST), 1.0);
      sb[c] = (1 - eta) * sb[c] + eta * (target - stat);
      xp[c] = mu_p[c] - sb[c] * shrink;
      xb[c] = (1 - x_eta) * xb[c] + x_eta * xp[c];
      next.data_ptr<double>()[c] = xp[c];
    }
    step = at::exp(next);
    // adaptation.Welford.update (in a slow window)
    if (window[done]) {
      ++welford_n;
      const double* zz = z.data_ptr<double>();
      for (int64_t i = 0; i < C * D; ++i) {
        const double delta = zz[i] - mean_p[i];
        mean_p[i] = mean_p[i] + delta / double(welford_n);
        const double after = zz[i] - mean_p[i];
        m2_p[i] = m2_p[i] + delta * after;
      }
    }
  }
  auto counts = uninitialised({4}, at::kLong);
  int64_t* cp = counts.data_ptr<int64_t>();
  cp[0] = done, cp[1] = runs.redone, cp[2] = counter, cp[3] = welford_n;
  auto failed_p0 = done < n ? runs.p0 : uninitialised({0}, at::kDouble);
  auto failed_u = done < n ? runs.u : uninitialised({0}, at::kDouble);
  return {counts, z, logp, grad, step, runs.recent_depths(), failed_p0, failed_u};
}

}  // namespace

TORCH_LIBRARY(ppl_nuts, m) {
  m.def("transition(str library, Tensor z, Tensor logp, Tensor grad, Tensor p0, Tensor u, Tensor u_leaf, "
        "Tensor step, Tensor inv_mass, int fresh, int K, Tensor[] args) -> Tensor[]");
  m.def("transitions(str library, Tensor z, Tensor logp, Tensor grad, Tensor sqrt_mass, Tensor step, "
        "Tensor inv_mass, Tensor uniforms, Generator? gen, int n, int K, int[] recent, Tensor[] args) -> Tensor[]");
  m.def("warmup(str library, Tensor z, Tensor logp, Tensor grad, Tensor sqrt_mass, Tensor step, Tensor inv_mass, "
        "Tensor uniforms, Generator? gen, int n, int K, int[] recent, Tensor[] args, Tensor mu, Tensor s_bar, "
        "Tensor x, Tensor x_bar, int counter, float target, float gamma, float t0, float kappa, Tensor mean, "
        "Tensor m2, int welford_n, Tensor in_window, Tensor divergences) -> Tensor[]");
  m.def("use_arrayref(bool on) -> bool", &use_arrayref);
  m.def("arrayref_calls() -> int", &calls_through_arrayref);
}

TORCH_LIBRARY_IMPL(ppl_nuts, CPU, m) {
  m.impl("transition", &transition);
  m.impl("transitions", &transitions);
  m.impl("warmup", &warmup);
}
"""


def compiler_flags() -> list[str]:
    """The C++ compiler's flags for the operator: -O3, and where the CPU has AVX (torch's CPU
    capability AVX2 or AVX512) the VEX encoding of its scalar floating-point code
    (``-mavx``). Why: the potential's kernels run AVX-512/AVX2 code; legacy SSE instructions
    right after them pay a transition penalty, which made the transition's own few hundred
    operations per leaf cost ~4.8 us on logistic regression (4 chains, 3 dimensions) instead
    of ~0.9. No FMA contraction (``-ffp-contract=off``): the same arithmetic, bit for bit,
    as the SSE build and as ``nuts_loop.transition`` run eagerly."""
    flags = ["-O3", "-ffp-contract=off"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags.append("-mavx")
    return flags


def _name() -> str:
    key = f"{torch.__version__}|{SOURCE}|{' '.join(compiler_flags())}"
    return "ppl_nuts_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def library_path() -> str:
    """Where the built operator library lives (built or not): in the build directory that
    ``torch.utils.cpp_extension`` gives the extension (``_get_build_directory``), found
    without importing that module, which imports setuptools: ~30 ms of every NUTS run that
    only loads the library (``tests/test_nuts_loop.py`` checks both give the same place)."""
    import sys

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch import _appdirs
        if torch.version.hip is not None:
            accelerator = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accelerator = "cu" + torch.version.cuda.replace(".", "")
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")),
                            f"{python}_{accelerator}")
    return os.path.join(root, _name(), _name() + ".so")


_LOADED = False


def load() -> None:
    """Make ``torch.ops.ppl_nuts.transition`` available: load the built library, or build
    it first (a minute or so of the C++ compiler, once per machine and source version)."""
    global _LOADED
    if _LOADED:
        return
    path = library_path()
    if os.path.exists(path):
        torch.ops.load_library(path)
    else:
        from torch.utils.cpp_extension import load_inline
        load_inline(_name(), cpp_sources=[SOURCE], is_python_module=False, no_implicit_headers=True,
                    extra_cflags=compiler_flags(), verbose=False)
    torch.ops.ppl_nuts.use_arrayref(os.environ.get("PPL_NATIVE_ARRAYREF") != "0")
    _LOADED = True


def use_arrayref(on: bool) -> bool:
    """Whether the C++ loops call a potential's library through its minimal ArrayRef entry
    point where it has one (``compiled._buffer_options``; the default) or through the
    container's ``run`` (``PPL_NATIVE_ARRAYREF=0``): the same kernels, the same numbers.
    Returns the previous setting."""
    load()
    return bool(torch.ops.ppl_nuts.use_arrayref(on))


def arrayref_calls() -> int:
    """How many potential calls this process made through a library's ArrayRef entry point."""
    load()
    return int(torch.ops.ppl_nuts.arrayref_calls())


def built() -> bool:
    """Whether the operator library is built on this machine (loading it is then cheap)."""
    try:
        return os.path.exists(library_path())
    except Exception:  # noqa: BLE001 - (a torch without this private helper: not known to be built)
        return False


def transitions_native(library: str, z, logp, grad, sqrt_mass, step, inv_mass, uniforms, generator, n: int,
                       max_tree_depth: int, recent: list, args) -> list:
    """``n`` transitions of ``transition_native`` in a row, drawing their momenta and uniforms
    from ``generator`` as ``hmc.nuts_step`` and ``nuts_loop.CompiledTransition`` do (the
    operator's comment in ``SOURCE`` lists its outputs)."""
    return torch.ops.ppl_nuts.transitions(library, z, logp, grad, sqrt_mass, step, inv_mass, uniforms, generator,
                                          n, max_tree_depth, list(recent), list(args))


def warmup_native(library: str, z, logp, grad, sqrt_mass, step, inv_mass, uniforms, generator, n: int,
                  max_tree_depth: int, recent: list, args, dual, welford, in_window, divergences) -> list:
    """``n`` warm-up iterations of ``transitions_native`` with their adaptation (``dual``: an
    ``adaptation.DualAveraging``, ``welford``: an ``adaptation.Welford`` on the host, both updated
    in place; the operator's comment in ``SOURCE`` says what it does and returns)."""
    import numpy as np
    state = [torch.from_numpy(np.ascontiguousarray(a)) for a in (dual.mu, dual.s_bar, dual.x, dual.x_bar,
                                                                 welford.mean, welford.m2)]
    out = torch.ops.ppl_nuts.warmup(library, z, logp, grad, sqrt_mass, step, inv_mass, uniforms, generator, n,
                                    max_tree_depth, list(recent), list(args), *state[:4], dual.counter,
                                    dual.target, dual.gamma, dual.t0, dual.kappa, state[4], state[5], welford.n,
                                    in_window, divergences)
    dual.mu, dual.s_bar, dual.x, dual.x_bar = (t.numpy() for t in state[:4])
    welford.mean, welford.m2 = state[4].numpy(), state[5].numpy()
    return out


def transition_native(library: str, z, logp, grad, p0, u, u_leaf, step, inv_mass, fresh: int, max_tree_depth: int,
                      args) -> list:
    """``nuts_loop.transition`` with ``evaluate_at(z) = library(z, *args)`` (an AOTInductor
    library, or a package where ``library`` ends in ``.pt2``, of the potential: (logp, grad,
    parameters valid?), non-finite values mapped as ``hmc.evaluate`` maps them), run in C++."""
    return torch.ops.ppl_nuts.transition(library, z, logp, grad, p0, u, u_leaf, step, inv_mass, fresh,
                                         max_tree_depth, list(args))
