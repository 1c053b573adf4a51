// A frozen element network's ensemble, forward and input gradient in one call.
//
// For each member m and atom i: the energy E_mi of the MLP (CELU hidden layers, linear
// output) and J_mi = ∂E_mi/∂x_i, the gradient with respect to that atom's features.
// aniserve/networks.py (_FrozenMLP) turns J into the backward pass: ∂L/∂x_i =
// Σ_m (∂L/∂E_mi) J_mi.  Computing J during the forward pass lets a small molecule's
// whole network evaluation run here, as a few register-blocked matrix products per
// layer, without the fixed cost of a library call per product.
//
// Work is split into (member, block of up to kRows atoms) tasks across torch's OpenMP
// threads (see aev.cpp); each task owns its rows of E and J.  The row count is a template
// parameter, so a block of fewer atoms (an element with one or two atoms in a small
// molecule, the last block of any element) does only its own rows' arithmetic.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int kRows = 6;  // atoms per task at most: the rows of a register block

// Explicit vectors (GCC/Clang extension): 32 bytes, one AVX register where there is AVX.
template <typename T>
struct Vector {
    typedef T type __attribute__((vector_size(32)));
    typedef T unaligned __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
    static constexpr int width = 32 / sizeof(T);
    static type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
    static void store(T* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
};

// C[r, :] = bias + A[r, :] B for r < R; A (R, K) with row stride lda, B (K, N) row-major,
// C (R, N) with row stride ldc.  A register block of R × (V vectors) accumulates over
// all of K; N must be a multiple of V vectors.
template <typename T, int R, int V>
void product(int64_t K, int64_t N, const T* A, int64_t lda, const T* B, const T* bias, T* C, int64_t ldc) {
    typedef Vector<T> Vec;
    typedef typename Vec::type vec;
    constexpr int W = Vec::width;
    for (int64_t c0 = 0; c0 < N; c0 += V * W) {
        vec acc[R][V];
        for (int j = 0; j < V; ++j) {
            const vec start = bias ? Vec::load(bias + c0 + j * W) : vec{};
            for (int r = 0; r < R; ++r) acc[r][j] = start;
        }
        for (int64_t k = 0; k < K; ++k) {
            vec b[V];
            for (int j = 0; j < V; ++j) b[j] = Vec::load(B + k * N + c0 + j * W);
            for (int r = 0; r < R; ++r) {
                const T a = A[r * lda + k];
                for (int j = 0; j < V; ++j) acc[r][j] += a * b[j];
            }
        }
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < V; ++j) Vec::store(C + r * ldc + c0 + j * W, acc[r][j]);
    }
}

// The same, one column at a time, for widths that are not a multiple of a vector.
template <typename T, int R>
void product_scalar(int64_t K, int64_t N, const T* A, int64_t lda, const T* B, const T* bias, T* C, int64_t ldc) {
    for (int r = 0; r < R; ++r)
        for (int64_t c = 0; c < N; ++c) {
            T acc = bias ? bias[c] : T(0);
            for (int64_t k = 0; k < K; ++k) acc += A[r * lda + k] * B[k * N + c];
            C[r * ldc + c] = acc;
        }
}

template <typename T, int R>
void product_any(int64_t K, int64_t N, const T* A, int64_t lda, const T* B, const T* bias, T* C, int64_t ldc) {
    constexpr int W = Vector<T>::width;
    if (N % (2 * W) == 0) return product<T, R, 2>(K, N, A, lda, B, bias, C, ldc);
    if (N % W == 0) return product<T, R, 1>(K, N, A, lda, B, bias, C, ldc);
    return product_scalar<T, R>(K, N, A, lda, B, bias, C, ldc);
}

// C[r, c] = Σ_k A[r, k] B[c, k] for r < R: A (R, K) with row stride lda, B (N, K)
// row-major, C (R, N) with row stride ldc.  The backward pass's product with a
// layer's transpose, reading the weights as stored, along their rows: the forward pass
// has just brought them into cache, and no transposed copy need exist.
template <typename T, int R>
void product_transposed(int64_t K, int64_t N, const T* A, int64_t lda, const T* B, T* C, int64_t ldc) {
    typedef Vector<T> Vec;
    typedef typename Vec::type vec;
    constexpr int W = Vec::width;
    if (K % W != 0) {  // widths that are not a multiple of a vector: one term at a time
        for (int r = 0; r < R; ++r)
            for (int64_t c = 0; c < N; ++c) {
                T acc = 0;
                for (int64_t k = 0; k < K; ++k) acc += A[r * lda + k] * B[c * K + k];
                C[r * ldc + c] = acc;
            }
        return;
    }
    auto sum = [](vec v) {
        T total = 0;
        for (int i = 0; i < W; ++i) total += v[i];
        return total;
    };
    int64_t c = 0;
    for (; c + 2 <= N; c += 2) {
        vec acc[R][2] = {};
        for (int64_t k = 0; k < K; k += W) {
            const vec b0 = Vec::load(B + c * K + k), b1 = Vec::load(B + (c + 1) * K + k);
            for (int r = 0; r < R; ++r) {
                const vec a = Vec::load(A + r * lda + k);
                acc[r][0] += a * b0;
                acc[r][1] += a * b1;
            }
        }
        for (int r = 0; r < R; ++r) C[r * ldc + c] = sum(acc[r][0]), C[r * ldc + c + 1] = sum(acc[r][1]);
    }
    for (; c < N; ++c) {
        vec acc[R] = {};
        for (int64_t k = 0; k < K; k += W) {
            const vec b = Vec::load(B + c * K + k);
            for (int r = 0; r < R; ++r) acc[r] += Vec::load(A + r * lda + k) * b;
        }
        for (int r = 0; r < R; ++r) C[r * ldc + c] = sum(acc[r]);
    }
}

// In place: z → CELU(z); slope ← CELU'(z) = exp(min(z, 0)/α).
template <typename T>
void celu(int64_t n, T* __restrict z, T alpha, T* __restrict slope) {
    const T inverse = T(1) / alpha;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const T zi = z[i];
        // std::min/max return their first argument when comparing a NaN, so a NaN stays
        // NaN (as in the tensor path); as min/max rather than branches the loop
        // vectorizes, with libmvec's expm1 and exp (scalar calls cost as much as the
        // layer's products on a small molecule).
        const T negative = std::min(zi, T(0)) * inverse;
        z[i] = std::max(zi, T(0)) + alpha * std::expm1(negative);
        slope[i] = std::exp(negative);
    }
}

template <typename T>
struct Network {
    int64_t members, layers;   // layers counts the output layer
    const int64_t* sizes;      // (layers + 1,): input width, hidden widths, 1
    const T* const* weights;   // per layer: (members, in, out)
    const T* const* biases;    // per layer: (members, out)
    T alpha;
};

// Per-thread buffers, kRows rows each: every hidden layer's activations and CELU
// slopes, and the backward pass's gradients.
template <typename T>
struct Workspace {
    int64_t widest = 0;
    std::vector<T> slopes, acts, g, h;

    explicit Workspace(const Network<T>& net) {
        for (int64_t l = 0; l <= net.layers; ++l) widest = std::max(widest, net.sizes[l]);
        slopes.resize(kRows * widest * net.layers);
        acts.resize(kRows * widest * net.layers);
        g.resize(kRows * widest);
        h.resize(kRows * widest);
    }
};

// One task: member m, atoms [i0, i0 + R).  Reads its features and writes its rows of
// the energies and gradients in place.
template <typename T, int R>
void task(const Network<T>& net, Workspace<T>& work, int64_t m, int64_t i0, const T* features, T* energies,
          T* gradients, int64_t n) {
    const int64_t L = net.layers, in = net.sizes[0], widest = work.widest;
    std::vector<T>&slopes = work.slopes, &acts = work.acts, &g = work.g, &h = work.h;
    const T* a = features + i0 * in;
    int64_t lda = in;
    for (int64_t l = 0; l + 1 < L; ++l) {
        const int64_t K = net.sizes[l], N = net.sizes[l + 1];
        T* z = acts.data() + l * kRows * widest;
        product_any<T, R>(K, N, a, lda, net.weights[l] + m * K * N, net.biases[l] + m * N, z, widest);
        for (int r = 0; r < R; ++r) celu(N, z + r * widest, net.alpha, slopes.data() + l * kRows * widest + r * widest);
        a = z;
        lda = widest;
    }
    // Output layer (one unit): E = a·w + b, and ∂E/∂a = w.
    const int64_t K = net.sizes[L - 1];
    const T* w = net.weights[L - 1] + m * K;
    const T b = net.biases[L - 1][m];
    for (int r = 0; r < R; ++r) {
        T e = b;
        for (int64_t k = 0; k < K; ++k) e += a[r * lda + k] * w[k];
        energies[m * n + i0 + r] = e;
    }
    T* out = gradients + (m * n + i0) * in;  // this task's rows of J
    if (L == 1) {  // no hidden layer: ∂E/∂x = w
        for (int r = 0; r < R; ++r) std::memcpy(out + r * in, w, sizeof(T) * in);
        return;
    }
    // Backward through the hidden layers: ∂E/∂a_(l−1) = (∂E/∂a_l ⊙ slope_l) W_lᵀ.
    for (int r = 0; r < R; ++r)
        for (int64_t k = 0; k < K; ++k) g[r * widest + k] = w[k];
    for (int64_t l = L - 2; l >= 0; --l) {
        const int64_t K_in = net.sizes[l], N_out = net.sizes[l + 1];
        const T* s = slopes.data() + l * kRows * widest;
        for (int r = 0; r < R; ++r)
            for (int64_t k = 0; k < N_out; ++k) g[r * widest + k] *= s[r * widest + k];
        const T* Wl = net.weights[l] + m * K_in * N_out;  // (in, out)
        if (l == 0) {
            product_transposed<T, R>(N_out, K_in, g.data(), widest, Wl, out, in);
        } else {
            product_transposed<T, R>(N_out, K_in, g.data(), widest, Wl, h.data(), widest);
            std::swap(g, h);
        }
    }
}

template <typename T>
void run(const Network<T>& net, int64_t n, const T* features, T* energies, T* gradients, int threads) {
    static_assert(kRows == 6, "the dispatch below lists the row counts 1..kRows");
    const int64_t blocks = (n + kRows - 1) / kRows, tasks = net.members * blocks;
    // Threads pay off from a few tasks of a typical ANI network.
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks / 4)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Workspace<T> work(net);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t m = t / blocks, i0 = (t % blocks) * kRows;
            switch (std::min<int64_t>(kRows, n - i0)) {
                case 1: task<T, 1>(net, work, m, i0, features, energies, gradients, n); break;
                case 2: task<T, 2>(net, work, m, i0, features, energies, gradients, n); break;
                case 3: task<T, 3>(net, work, m, i0, features, energies, gradients, n); break;
                case 4: task<T, 4>(net, work, m, i0, features, energies, gradients, n); break;
                case 5: task<T, 5>(net, work, m, i0, features, energies, gradients, n); break;
                default: task<T, 6>(net, work, m, i0, features, energies, gradients, n); break;
            }
        }
    }
}

}  // namespace

// features (n, sizes[0]); energies (members, n); gradients (members, n, sizes[0]).
extern "C" {

void mlp_f32(int64_t members, int64_t layers, const int64_t* sizes, const float* const* weights,
             const float* const* biases, float alpha, int64_t n, const float* features, float* energies,
             float* gradients, int threads) {
    run(Network<float>{members, layers, sizes, weights, biases, alpha}, n, features, energies, gradients, threads);
}

void mlp_f64(int64_t members, int64_t layers, const int64_t* sizes, const double* const* weights,
             const double* const* biases, double alpha, int64_t n, const double* features, double* energies,
             double* gradients, int threads) {
    run(Network<double>{members, layers, sizes, weights, biases, alpha}, n, features, energies, gradients, threads);
}

}  // extern "C"
