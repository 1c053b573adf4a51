// ANI atomic environment vectors and their gradient, fused, on the CPU.
//
// The same terms, constants and column layout as the tensor implementation in
// aniserve/aev.py (whose docstrings give the formulas); this file only changes how they
// are computed: one pass over each center's pairs, the angular triplets enumerated on
// the fly, no intermediate arrays.  Pairs are directed, sorted by center, and given as
// displacement vectors r_j − r_i (Å).  Every center writes only its own AEV row and the
// gradient rows of its own pairs, so centers split across threads without locks.
//
// Built on first use by aniserve/kernels/__init__.py, which declares the same
// Constants layout with ctypes.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "vector_math.h"

namespace {

struct Constants {
    int64_t num_species, num_shf_r, num_shf_a, num_shf_z, num_pairs;
    double Rcr, Rca, EtaR, EtaA, Zeta;
    const double* ShfR;        // (num_shf_r,)
    const double* ShfA;        // (num_shf_a,)
    const double* cos_z;       // cos ShfZ, (num_shf_z,)
    const double* sin_z;       // sin ShfZ
    const int64_t* pair_index; // (num_species, num_species): angular block of a species pair
};

// Transcendental functions are evaluated over fixed-width lanes (the constant arrays
// padded with harmless values), so that the compiler turns each loop into a few vector
// calls of glibc's libmvec (vector_math.h); a model's arrays must fit.
// ANI-1x, ANI-1ccx: 16 ShfR, 4 ShfA, 8 ShfZ; ANI-2x: 16, 8, 4.
constexpr int kRadialLanes = 16;
constexpr int kLanes = 8;  // ShfA and ShfZ

template <typename T>
struct Terms {
    int64_t S, R, A, Z, width, angular_start;
    T Rcr, Rca, EtaR, EtaA, Zeta;
    int zeta_power;  // ζ − 1 when ζ is a whole number up to 65 (ANI-1x's 32), else 0
    alignas(64) T ShfR[kRadialLanes];
    alignas(64) T ShfA[kLanes];
    alignas(64) T cz[kLanes];
    alignas(64) T sz[kLanes];
    const int64_t* pair_index;

    explicit Terms(const Constants& c)
        : S(c.num_species), R(c.num_shf_r), A(c.num_shf_a), Z(c.num_shf_z),
          width(c.num_species * c.num_shf_r + c.num_pairs * c.num_shf_a * c.num_shf_z),
          angular_start(c.num_species * c.num_shf_r),
          Rcr(T(c.Rcr)), Rca(T(c.Rca)), EtaR(T(c.EtaR)), EtaA(T(c.EtaA)), Zeta(T(c.Zeta)),
          zeta_power(c.Zeta == std::floor(c.Zeta) && c.Zeta >= 2 && c.Zeta <= 65 ? int(c.Zeta) - 1 : 0),
          pair_index(c.pair_index) {
        for (int r = 0; r < kRadialLanes; ++r) ShfR[r] = r < R ? T(c.ShfR[r]) : T(0);
        for (int a = 0; a < kLanes; ++a) ShfA[a] = a < A ? T(c.ShfA[a]) : T(0);
        for (int z = 0; z < kLanes; ++z) cz[z] = z < Z ? T(c.cos_z[z]) : T(1), sz[z] = z < Z ? T(c.sin_z[z]) : T(0);
    }
};

const double kPi = 3.14159265358979323846;

// What a triplet needs of one pair within Rca.
template <typename T>
struct AngularPair {
    int64_t pair, species;
    T u[3], d, fc, dfc;  // unit vector, distance, cutoff function and its derivative
};

template <typename T>
void cutoff(T d, T rc, T& fc, T& dfc) {
    const T k = T(kPi / double(rc));  // rounded once, as the tensor version's π/Rc
    fc = T(0.5) * std::cos(d * k) + T(0.5);
    dfc = T(-0.5) * k * std::sin(d * k);
}

// Gathers the pairs of one center within Rca, and handles the radial terms on the way
// (forward: adds them to the row; backward: adds their gradient to the pair's vector).
template <typename T, bool Backward>
void radial_and_gather(const Terms<T>& t, int64_t p0, int64_t p1, const int64_t* species,
                       const int64_t* neighbor, const T* vectors, T* row, const T* grad_row,
                       T* grad_vectors, std::vector<AngularPair<T>>& near) {
    near.clear();
    for (int64_t p = p0; p < p1; ++p) {
        const T* v = vectors + 3 * p;
        const T d = std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
        const int64_t s = species[neighbor[p]];
        if (d <= t.Rcr) {
            T fc, dfc;
            cutoff(d, t.Rcr, fc, dfc);
            if (!Backward) {
                T terms[kRadialLanes];
#pragma omp simd
                for (int r = 0; r < kRadialLanes; ++r) {
                    const T x = d - t.ShfR[r];
                    terms[r] = T(0.25) * std::exp(-t.EtaR * x * x) * fc;
                }
                T* out = row + s * t.R;
                for (int64_t r = 0; r < t.R; ++r) out[r] += terms[r];
            } else {
                T slopes[kRadialLanes];
#pragma omp simd
                for (int r = 0; r < kRadialLanes; ++r) {
                    const T x = d - t.ShfR[r];
                    slopes[r] = std::exp(-t.EtaR * x * x) * (dfc - T(2) * t.EtaR * x * fc);
                }
                const T* g = grad_row + s * t.R;
                T dd = 0;
                for (int64_t r = 0; r < t.R; ++r) dd += g[r] * slopes[r];
                dd *= T(0.25) / d;
                for (int k = 0; k < 3; ++k) grad_vectors[3 * p + k] += dd * v[k];
            }
        }
        if (d <= t.Rca) {
            AngularPair<T> a;
            a.pair = p;
            a.species = s;
            for (int k = 0; k < 3; ++k) a.u[k] = v[k] / d;
            a.d = d;
            cutoff(d, t.Rca, a.fc, a.dfc);
            near.push_back(a);
        }
    }
}

// Angular terms of one triplet: f1_z = x_z^ζ with x_z = (1 + cos θ'·cos ShfZ_z +
// sin θ'·sin ShfZ_z)/2, cos θ' = 0.95 cos θ (so no arccos), and f2_a = 2 exp(−η s_a²) c_j c_k
// with s_a = (R_ij + R_ik)/2 − ShfA_a.  Also x_z^(ζ−1) and exp(−η s_a²) for the gradient.
template <typename T>
struct Triplet {
    T cos_t, sin_t;
    alignas(64) T f1[kLanes];
    alignas(64) T f1_over_x[kLanes];
    alignas(64) T s[kLanes];
    alignas(64) T g[kLanes];
    alignas(64) T f2[kLanes];

    Triplet(const Terms<T>& t, const AngularPair<T>& j, const AngularPair<T>& k) {
        cos_t = T(0.95) * (j.u[0] * k.u[0] + j.u[1] * k.u[1] + j.u[2] * k.u[2]);
        sin_t = std::sqrt(1 - cos_t * cos_t);
        alignas(64) T x[kLanes];
#pragma omp simd
        for (int z = 0; z < kLanes; ++z) x[z] = (1 + cos_t * t.cz[z] + sin_t * t.sz[z]) / 2;
        if (t.zeta_power) {
            // A whole power by squaring, in double: a few multiplications where pow
            // costs a log and an exp, and (rounded once, at the end) as exact as pow.
            alignas(64) double p[kLanes], base[kLanes];
#pragma omp simd
            for (int z = 0; z < kLanes; ++z) p[z] = 1, base[z] = double(x[z]);
            for (int e = t.zeta_power; e; e >>= 1) {
#pragma omp simd
                for (int z = 0; z < kLanes; ++z) {
                    if (e & 1) p[z] *= base[z];
                    base[z] *= base[z];
                }
            }
#pragma omp simd
            for (int z = 0; z < kLanes; ++z) f1_over_x[z] = T(p[z]), f1[z] = T(p[z] * double(x[z]));
        } else {
#pragma omp simd
            for (int z = 0; z < kLanes; ++z) {
                f1_over_x[z] = std::pow(x[z], t.Zeta - 1);
                f1[z] = f1_over_x[z] * x[z];
            }
        }
        const T mean = (j.d + k.d) / 2, cc = 2 * j.fc * k.fc;
#pragma omp simd
        for (int a = 0; a < kLanes; ++a) {
            s[a] = mean - t.ShfA[a];
            g[a] = std::exp(-t.EtaA * s[a] * s[a]);
            f2[a] = g[a] * cc;
        }
    }
};

template <typename T>
int64_t angular_column(const Terms<T>& t, const AngularPair<T>& j, const AngularPair<T>& k) {
    return t.angular_start + t.pair_index[j.species * t.S + k.species] * t.A * t.Z;
}

// The gradient of one triplet's terms, given G (the incoming gradient of its A×Z block),
// added to the vectors of its two pairs.  With q_a = Σ_z G_az f1_z, h_z = Σ_a G_az f2_a:
//   ∂/∂cos θ' = Σ_z h_z ζ x_z^(ζ−1) (cos ShfZ_z − sin ShfZ_z cos θ'/sin θ')/2
//   ∂/∂R_ij (through s) = −η Σ_a q_a f2_a s_a, the same for R_ik
//   ∂/∂c_j = 2 c_k Σ_a q_a exp(−η s_a²), and symmetrically
// and cos θ' = 0.95 u_j·u_k gives ∂cos θ'/∂v_j = (0.95 u_k − cos θ' u_j)/R_ij.
template <typename T>
void triplet_gradient(const Terms<T>& t, const Triplet<T>& tr, const T* G, const AngularPair<T>& j,
                      const AngularPair<T>& k, T* grad_vectors) {
    T h[kLanes] = {};
    T dd = 0, dfc_sum = 0;
    for (int64_t a = 0; a < t.A; ++a) {
        const T* Ga = G + a * t.Z;
        T q = 0;
        for (int64_t z = 0; z < t.Z; ++z) {
            q += Ga[z] * tr.f1[z];
            h[z] += Ga[z] * tr.f2[a];
        }
        dd += q * tr.f2[a] * tr.s[a];
        dfc_sum += q * tr.g[a];
    }
    dd *= -t.EtaA;
    T dcos = 0;
    const T cot = tr.cos_t / tr.sin_t;
    for (int64_t z = 0; z < t.Z; ++z) dcos += h[z] * tr.f1_over_x[z] * (t.cz[z] - t.sz[z] * cot);
    dcos *= t.Zeta / 2;
    const T radial_j = dd + 2 * k.fc * dfc_sum * j.dfc, radial_k = dd + 2 * j.fc * dfc_sum * k.dfc;
    T* gj = grad_vectors + 3 * j.pair;
    T* gk = grad_vectors + 3 * k.pair;
    for (int c = 0; c < 3; ++c) {
        gj[c] += dcos * (T(0.95) * k.u[c] - tr.cos_t * j.u[c]) / j.d + radial_j * j.u[c];
        gk[c] += dcos * (T(0.95) * j.u[c] - tr.cos_t * k.u[c]) / k.d + radial_k * k.u[c];
    }
}

template <typename T, bool Backward>
void centers(const Terms<T>& t, int64_t c0, int64_t c1, const int64_t* first, const int64_t* species,
             const int64_t* neighbor, const T* vectors, T* out, const T* grad, T* grad_vectors) {
    std::vector<AngularPair<T>> near;
    for (int64_t i = c0; i < c1; ++i) {
        T* row = Backward ? nullptr : out + i * t.width;
        const T* grad_row = Backward ? grad + i * t.width : nullptr;
        radial_and_gather<T, Backward>(t, first[i], first[i + 1], species, neighbor, vectors, row, grad_row,
                                       grad_vectors, near);
        const int64_t n = static_cast<int64_t>(near.size());
        for (int64_t a = 0; a < n; ++a) {
            for (int64_t b = a + 1; b < n; ++b) {
                const Triplet<T> tr(t, near[a], near[b]);
                const int64_t col = angular_column(t, near[a], near[b]);
                if (!Backward) {
                    T* block = row + col;
                    for (int64_t x = 0; x < t.A; ++x)
                        for (int64_t z = 0; z < t.Z; ++z) block[x * t.Z + z] += tr.f2[x] * tr.f1[z];
                } else {
                    triplet_gradient(t, tr, grad_row + col, near[a], near[b], grad_vectors);
                }
            }
        }
    }
}

// Splits the centers into runs of about equal pair counts and runs them in parallel.
// Built with -fopenmp, the library shares torch's OpenMP runtime (the same
// libgomp.so.1, already loaded), so its threads are torch's: a second pool would contend
// with torch's threads, which spin for a while after each parallel operation.
template <typename T, bool Backward>
int run(const Constants& c, int64_t n_atoms, int64_t n_pairs, const int64_t* species, const int64_t* center,
        const int64_t* neighbor, const T* vectors, T* out, const T* grad, T* grad_vectors, int threads) {
    if (c.num_shf_r > kRadialLanes || c.num_shf_a > kLanes || c.num_shf_z > kLanes) return 1;
    const Terms<T> t(c);
    // first[i]: the first pair of center i (pairs are sorted by center).
    std::vector<int64_t> first(n_atoms + 1);
    for (int64_t i = 0; i <= n_atoms; ++i)
        first[i] = std::lower_bound(center, center + n_pairs, i) - center;
    // Threads pay off from a few hundred pairs each (a pair and its triplets take about
    // a microsecond; waking a thread, tens).  The centers go in runs of about equal pair
    // counts, four per thread, handed out as threads come free, so a thread that shares
    // its core with another process takes fewer.  Each center's results are the same
    // whichever thread computes them.
    threads = std::max(1, std::min<int>(threads, static_cast<int>(n_pairs / 256)));
    const int runs = threads > 1 ? 4 * threads : 1;
    std::vector<int64_t> bounds(runs + 1, n_atoms);
    bounds[0] = 0;
    for (int k = 1; k < runs; ++k)
        bounds[k] = std::lower_bound(first.begin(), first.end(), n_pairs * k / runs) - first.begin();
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
    for (int k = 0; k < runs; ++k)
        centers<T, Backward>(t, bounds[k], bounds[k + 1], first.data(), species, neighbor, vectors, out, grad,
                             grad_vectors);
    return 0;
}

}  // namespace

// out: (n_atoms, width), zeroed by the caller.  grad_vectors: (n_pairs, 3), zeroed.
// Return 0, or 1 when a constant array is longer than this build allows.
extern "C" {

int aev_forward_f32(const Constants* c, int64_t n_atoms, int64_t n_pairs, const int64_t* species,
                    const int64_t* center, const int64_t* neighbor, const float* vectors, float* out, int threads) {
    return run<float, false>(*c, n_atoms, n_pairs, species, center, neighbor, vectors, out, nullptr, nullptr, threads);
}

int aev_forward_f64(const Constants* c, int64_t n_atoms, int64_t n_pairs, const int64_t* species,
                    const int64_t* center, const int64_t* neighbor, const double* vectors, double* out, int threads) {
    return run<double, false>(*c, n_atoms, n_pairs, species, center, neighbor, vectors, out, nullptr, nullptr,
                              threads);
}

int aev_backward_f32(const Constants* c, int64_t n_atoms, int64_t n_pairs, const int64_t* species,
                     const int64_t* center, const int64_t* neighbor, const float* vectors, const float* grad,
                     float* grad_vectors, int threads) {
    return run<float, true>(*c, n_atoms, n_pairs, species, center, neighbor, vectors, nullptr, grad, grad_vectors,
                            threads);
}

int aev_backward_f64(const Constants* c, int64_t n_atoms, int64_t n_pairs, const int64_t* species,
                     const int64_t* center, const int64_t* neighbor, const double* vectors, const double* grad,
                     double* grad_vectors, int threads) {
    return run<double, true>(*c, n_atoms, n_pairs, species, center, neighbor, vectors, nullptr, grad, grad_vectors,
                             threads);
}

// The layout of Constants, for the test that holds kernels._Constants (its ctypes
// mirror) to it: out[0] = sizeof, then the offset of each field in declaration order.
void aev_constants_layout(int64_t* out) {
    const int64_t offsets[] = {
        offsetof(Constants, num_species), offsetof(Constants, num_shf_r), offsetof(Constants, num_shf_a),
        offsetof(Constants, num_shf_z), offsetof(Constants, num_pairs), offsetof(Constants, Rcr),
        offsetof(Constants, Rca), offsetof(Constants, EtaR), offsetof(Constants, EtaA), offsetof(Constants, Zeta),
        offsetof(Constants, ShfR), offsetof(Constants, ShfA), offsetof(Constants, cos_z), offsetof(Constants, sin_z),
        offsetof(Constants, pair_index)};
    out[0] = sizeof(Constants);
    for (int i = 0; i < 15; ++i) out[i + 1] = offsets[i];
}

}  // extern "C"
