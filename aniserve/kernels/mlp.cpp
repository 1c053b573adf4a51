// Frozen element networks' ensembles, forward and input gradient in one call.
//
// For each member m and atom i: the energy E_mi of the atom's element network (CELU
// hidden layers, linear output), or the sum of several (a base and its Δ correction),
// and J_mi = ∂E_mi/∂x_i, the gradient with respect to that atom's features.
// aniserve/networks.py (_FrozenNetworks) turns J into the backward pass: ∂L/∂x_i =
// Σ_m (∂L/∂E_mi) J_mi.  Computing J during the forward pass lets a small molecule's
// whole network evaluation, every element at once, run here as a few register-blocked
// matrix products per layer, without the fixed cost of a library call per product.
//
// The atoms come grouped by element; each group's rows go through its networks.  Work
// is split into (group, member, block of up to kTaskRows atoms) tasks across torch's
// OpenMP threads (see aev.cpp); each task owns its rows of E and J, and runs all of
// its group's networks on them, the first writing, the others adding.  Every product,
// forward and backward, is C = A B with B packed in column panels (as BLAS libraries
// pack): the panel starting at column c0, of width w, holds B[k, c0 + j] at
// c0 K + k w + j, so a register block reads it front to back, and it stays in L1 while
// every block of rows passes over it.  The backward pass reads each hidden layer's
// transpose, packed the same way beside it (kernels.MLPKernelLayers), so it runs the
// same register blocks as the forward pass.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int kRows = 6;           // rows of a register block
constexpr int64_t kTaskRows = 48;  // atoms per task at most: its activations stay in L2

// Explicit vectors (GCC/Clang extension): 32 bytes, one AVX register where there is AVX.
template <typename T>
struct Vector {
    typedef T type __attribute__((vector_size(32)));
    typedef T unaligned __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
    static constexpr int width = 32 / sizeof(T);
    static type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
    static void store(T* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
};

// C[r, c0 : c0 + V W] = bias + A[r, :] B for r < R (with add, C += A B): one register
// block of R × V vectors, accumulated over all of K.  A (R, K) with row stride lda, B
// packed (see above), C with row stride ldc.
template <typename T, int R, int V>
inline void block(int64_t K, int64_t c0, const T* A, int64_t lda, const T* B, const T* bias, T* C,
                  int64_t ldc, bool add) {
    typedef Vector<T> Vec;
    typedef typename Vec::type vec;
    constexpr int W = Vec::width;
    vec acc[R][V];
    for (int j = 0; j < V; ++j) {
        const vec start = bias ? Vec::load(bias + c0 + j * W) : vec{};
        for (int r = 0; r < R; ++r) acc[r][j] = add ? Vec::load(C + r * ldc + c0 + j * W) : start;
    }
    for (int64_t k = 0; k < K; ++k) {
        vec b[V];
        for (int j = 0; j < V; ++j) b[j] = Vec::load(B + c0 * K + k * (V * W) + j * W);
        for (int r = 0; r < R; ++r) {
            const T a = A[r * lda + k];
            for (int j = 0; j < V; ++j) acc[r][j] += a * b[j];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < V; ++j) Vec::store(C + r * ldc + c0 + j * W, acc[r][j]);
}

// One column panel for all rows: the panel (K × V vectors) comes from L2 for the first
// block of rows and from L1 for the others.
template <typename T, int V>
void panel(int64_t rows, int64_t K, int64_t c0, const T* A, int64_t lda, const T* B, const T* bias,
           T* C, int64_t ldc, bool add) {
    static_assert(kRows == 6, "the dispatch below lists the row counts 1..kRows");
    int64_t r0 = 0;
    for (; r0 + kRows <= rows; r0 += kRows)
        block<T, kRows, V>(K, c0, A + r0 * lda, lda, B, bias, C + r0 * ldc, ldc, add);
    A += r0 * lda, C += r0 * ldc;
    switch (rows - r0) {  // the last block does only its own rows' arithmetic
        case 1: block<T, 1, V>(K, c0, A, lda, B, bias, C, ldc, add); break;
        case 2: block<T, 2, V>(K, c0, A, lda, B, bias, C, ldc, add); break;
        case 3: block<T, 3, V>(K, c0, A, lda, B, bias, C, ldc, add); break;
        case 4: block<T, 4, V>(K, c0, A, lda, B, bias, C, ldc, add); break;
        case 5: block<T, 5, V>(K, c0, A, lda, B, bias, C, ldc, add); break;
        default: break;
    }
}

// C = bias + A B (bias may be null), or with add C += A B (bias null): A (rows, K)
// with row stride lda, B (K, N) packed in panels of 2W, then W, then 1 column, C
// (rows, N) with row stride ldc.
template <typename T>
void product(int64_t rows, int64_t K, int64_t N, const T* A, int64_t lda, const T* B, const T* bias, T* C,
             int64_t ldc, bool add = false) {
    constexpr int W = Vector<T>::width;
    int64_t c0 = 0;
    for (; c0 + 2 * W <= N; c0 += 2 * W) panel<T, 2>(rows, K, c0, A, lda, B, bias, C, ldc, add);
    for (; c0 + W <= N; c0 += W) panel<T, 1>(rows, K, c0, A, lda, B, bias, C, ldc, add);
    for (; c0 < N; ++c0)  // widths that are not a multiple of a vector: one column at a time
        for (int64_t r = 0; r < rows; ++r) {
            T acc = add ? C[r * ldc + c0] : bias ? bias[c0] : T(0);
            for (int64_t k = 0; k < K; ++k) acc += A[r * lda + k] * B[c0 * K + k];
            C[r * ldc + c0] = acc;
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
        // vectorizes, with libmvec's expm1 (scalar calls cost as much as the layer's
        // products on a small molecule).  One transcendental per element: the slope is
        // 1 + expm1, which rounds to within an ulp of exp.
        const T e = std::expm1(std::min(zi, T(0)) * inverse);
        z[i] = std::max(zi, T(0)) + alpha * e;
        slope[i] = T(1) + e;
    }
}

template <typename T>
struct Network {
    int64_t members, layers;       // layers counts the output layer
    const int64_t* sizes;          // (layers + 1,): input width, hidden widths, 1
    const T* const* weights;       // per layer: (members, in, out), hidden layers packed
    const T* const* transposed;    // per hidden layer: its transpose (members, out, in), packed
    const T* const* biases;        // per layer: (members, out)
    T alpha;
};

// The first layers of a group's networks side by side (a Δ model's base and correction
// read the same features): weights (members, in, width) and their transpose packed as
// the hidden layers are, biases (members, width); network j's first layer is columns
// [column, column + its width).  One product then does what two did, and the narrow
// correction's first layer runs at the wide one's speed (alone, its 6-row × 2-vector
// blocks over 32 columns were a quarter as fast per operation as the base's).
struct FirstLayer {
    const void* weights;     // null: the network's first layer is its own
    const void* transposed;
    const void* biases;
    int64_t width, column;
};

// Per-thread buffers, kTaskRows rows each, large enough for any of the networks: every
// hidden layer's activations and CELU slopes, the backward pass's gradients, and a
// shared first layer's activations, slopes and gradients.
template <typename T>
struct Workspace {
    int64_t widest = 0, layers = 0, shared = 0;
    std::vector<T> slopes, acts, g, h, first_acts, first_slopes, first_grads;

    Workspace(const std::vector<Network<T>>& nets, const FirstLayer* first) {
        for (size_t j = 0; j < nets.size(); ++j) {
            const Network<T>& net = nets[j];
            layers = std::max(layers, net.layers);
            for (int64_t l = 0; l <= net.layers; ++l) widest = std::max(widest, net.sizes[l]);
            if (first[j].weights) shared = std::max(shared, first[j].width);
        }
        slopes.resize(kTaskRows * widest * layers);
        acts.resize(kTaskRows * widest * layers);
        g.resize(kTaskRows * widest);
        h.resize(kTaskRows * widest);
        first_acts.resize(kTaskRows * shared);
        first_slopes.resize(kTaskRows * shared);
        first_grads.resize(kTaskRows * shared);
    }
};

// One network's share of a task: member m, atoms [i0, i0 + rows).  Reads their
// features and writes (with add, adds to) their rows of the energies and gradients.
// With a shared first layer (first.weights), its activations and slopes are read from
// the workspace's shared buffers, where the caller computed them, and its gradient
// (∂E/∂z of the first layer) is left there, at the network's columns, for the caller's
// one product back to the features.
template <typename T>
void task(const Network<T>& net, const FirstLayer& first, Workspace<T>& work, int64_t m, int64_t i0, int64_t rows,
          const T* features, T* energies, T* gradients, int64_t n, bool add) {
    const int64_t L = net.layers, in = net.sizes[0], widest = work.widest, stride = kTaskRows * widest;
    T *slopes = work.slopes.data(), *acts = work.acts.data(), *g = work.g.data(), *h = work.h.data();
    const bool shared = first.weights != nullptr;
    const T* a = shared ? work.first_acts.data() + first.column : features + i0 * in;
    int64_t lda = shared ? first.width : in;
    for (int64_t l = shared ? 1 : 0; l + 1 < L; ++l) {
        const int64_t K = net.sizes[l], N = net.sizes[l + 1];
        T* z = acts + l * stride;
        product<T>(rows, K, N, a, lda, net.weights[l] + m * K * N, net.biases[l] + m * N, z, widest);
        for (int64_t r = 0; r < rows; ++r) celu(N, z + r * widest, net.alpha, slopes + l * stride + r * widest);
        a = z;
        lda = widest;
    }
    // Output layer (one unit): E = a·w + b, and ∂E/∂a = w.
    const int64_t K = net.sizes[L - 1];
    const T* w = net.weights[L - 1] + m * K;
    const T b = net.biases[L - 1][m];
    for (int64_t r = 0; r < rows; ++r) {
        T e = b;
        for (int64_t k = 0; k < K; ++k) e += a[r * lda + k] * w[k];
        energies[m * n + i0 + r] = add ? energies[m * n + i0 + r] + e : e;
    }
    T* out = gradients + (m * n + i0) * in;  // this task's rows of J
    if (L == 1) {  // no hidden layer: ∂E/∂x = w
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < in; ++k) out[r * in + k] = add ? out[r * in + k] + w[k] : w[k];
        return;
    }
    // Backward through the hidden layers: ∂E/∂a_(l−1) = (∂E/∂a_l ⊙ slope_l) W_lᵀ.
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) g[r * widest + k] = w[k];
    for (int64_t l = L - 2; l >= 0; --l) {
        const int64_t K_in = net.sizes[l], N_out = net.sizes[l + 1];
        if (shared && l == 0) {  // leave ∂E/∂z of the shared first layer to the caller
            const int64_t ld = first.width;
            const T* s = work.first_slopes.data() + first.column;
            T* out0 = work.first_grads.data() + first.column;
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t k = 0; k < N_out; ++k) out0[r * ld + k] = g[r * widest + k] * s[r * ld + k];
            return;
        }
        const T* s = slopes + l * stride;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < N_out; ++k) g[r * widest + k] *= s[r * widest + k];
        const T* Wt = net.transposed[l] + m * N_out * K_in;  // (out, in)
        if (l == 0) {
            product<T>(rows, N_out, K_in, g, widest, Wt, nullptr, out, in, add);
        } else {
            product<T>(rows, N_out, K_in, g, widest, Wt, nullptr, h, widest);
            std::swap(g, h);
        }
    }
}

// Atoms [start, start + rows) and the networks [first, last) that they go through.
struct Group {
    int64_t start, rows, first, last, blocks;
};

// Consecutive networks with the same rows form a group (two empty groups merging is
// harmless).
inline std::vector<Group> groups_of(int64_t count, const int64_t* starts, const int64_t* counts) {
    std::vector<Group> groups;
    for (int64_t j = 0; j < count; ++j) {
        if (groups.empty() || groups.back().start != starts[j] || groups.back().rows != counts[j])
            groups.push_back({starts[j], counts[j], j, j + 1, (counts[j] + kTaskRows - 1) / kTaskRows});
        else
            groups.back().last = j + 1;
    }
    return groups;
}

// A group's task with a shared first layer: one product forward, each network's CELU
// on its columns, the networks' remaining layers (energies added up), one product back.
template <typename T>
void shared_task(const std::vector<Network<T>>& nets, const FirstLayer* first, const Group& group,
                 Workspace<T>& work, int64_t m, int64_t i0, int64_t rows, const T* features, T* energies,
                 T* gradients, int64_t n) {
    const FirstLayer& f = first[group.first];
    const int64_t in = nets[group.first].sizes[0], W = f.width;
    const T* weights = static_cast<const T*>(f.weights) + m * in * W;
    const T* biases = static_cast<const T*>(f.biases) + m * W;
    product<T>(rows, in, W, features + i0 * in, in, weights, biases, work.first_acts.data(), W);
    for (int64_t j = group.first; j < group.last; ++j) {
        const int64_t c = first[j].column, N = nets[j].sizes[1];
        for (int64_t r = 0; r < rows; ++r)
            celu(N, work.first_acts.data() + r * W + c, nets[j].alpha, work.first_slopes.data() + r * W + c);
    }
    for (int64_t j = group.first; j < group.last; ++j)
        task<T>(nets[j], first[j], work, m, i0, rows, features, energies, gradients, n, j > group.first);
    const T* transposed = static_cast<const T*>(f.transposed) + m * W * in;
    product<T>(rows, W, in, work.first_grads.data(), W, transposed, nullptr, gradients + (m * n + i0) * in, in);
}

// Tasks are numbered group by group, member by member, block by block.
template <typename T>
void run(const std::vector<Network<T>>& nets, const FirstLayer* first, const std::vector<Group>& groups,
         const T* features, T* energies, T* gradients, int64_t n, int threads) {
    const int64_t members = nets.empty() ? 0 : nets[0].members;
    int64_t tasks = 0;
    for (const Group& group : groups) tasks += members * group.blocks;
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Workspace<T> work(nets, first);
        // Tasks are handed out as threads come free: a thread that shares its core (with
        // i-PI's socket thread, say) takes fewer, rather than holding up the rest.
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
            int64_t local = t;
            const Group* group = groups.data();
            while (local >= members * group->blocks) local -= members * (group++)->blocks;
            const int64_t m = local / group->blocks, i0 = group->start + (local % group->blocks) * kTaskRows;
            const int64_t rows = std::min(kTaskRows, group->start + group->rows - i0);
            if (first[group->first].weights) {
                shared_task<T>(nets, first, *group, work, m, i0, rows, features, energies, gradients, n);
                continue;
            }
            for (int64_t j = group->first; j < group->last; ++j)
                task<T>(nets[j], first[j], work, m, i0, rows, features, energies, gradients, n, j > group->first);
        }
    }
}

// 0, or 1 when the shapes handed in disagree (a network's input width is not the
// features' width, a layer count below one, rows outside [0, n)): the caller's checks
// are repeated here so that no caller can make the kernel read or write out of bounds.
template <typename T>
int run_networks(int64_t count, int64_t members, const int64_t* layers, const int64_t* const* sizes,
                 const T* const* const* weights, const T* const* const* transposed, const T* const* const* biases,
                 const T* alphas, const FirstLayer* first, const int64_t* starts, const int64_t* counts, int64_t n,
                 int64_t width, const T* features, T* energies, T* gradients, int threads) {
    if (count < 1 || members < 1 || n < 0) return 1;
    for (int64_t j = 0; j < count; ++j) {
        if (layers[j] < 1 || sizes[j][0] != width || starts[j] < 0 || counts[j] < 0 || starts[j] > n
            || counts[j] > n - starts[j] || sizes[j][layers[j]] != 1)
            return 1;
        for (int64_t l = 1; l < layers[j]; ++l)
            if (sizes[j][l] < 1) return 1;
    }
    const std::vector<Group> groups = groups_of(count, starts, counts);
    // A shared first layer must be every network's of its group, each network's columns
    // inside it, each network with a hidden layer.
    for (const Group& group : groups) {
        const FirstLayer& f = first[group.first];
        for (int64_t j = group.first; j < group.last; ++j) {
            if ((first[j].weights == nullptr) != (f.weights == nullptr)) return 1;
            if (f.weights
                && (first[j].weights != f.weights || first[j].transposed != f.transposed
                    || first[j].biases != f.biases || first[j].width != f.width || layers[j] < 2
                    || first[j].column < 0 || first[j].column > f.width - sizes[j][1]))
                return 1;
        }
    }
    std::vector<Network<T>> nets;
    for (int64_t j = 0; j < count; ++j)
        nets.push_back({members, layers[j], sizes[j], weights[j], transposed[j], biases[j], alphas[j]});
    run(nets, first, groups, features, energies, gradients, n, threads);
    return 0;
}

// The backward pass: out[i, :] = Σ_m grad[m, i] J[m, i, :] (one pass over J, where
// tensor operations would write a product as large as J and then sum it).
template <typename T>
void contract(int64_t members, int64_t n, int64_t width, const T* grad, const T* J, T* __restrict out) {
    for (int64_t i = 0; i < n; ++i) {
        T* o = out + i * width;
        const T g0 = grad[i];
        const T* j0 = J + i * width;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) o[c] = g0 * j0[c];
        for (int64_t m = 1; m < members; ++m) {
            const T g = grad[m * n + i];
            const T* jm = J + (m * n + i) * width;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) o[c] += g * jm[c];
        }
    }
}

}  // namespace

// count networks, network j: layers[j] layers of widths sizes[j] (layers[j] + 1 of
// them, the first the input width, the same for all), its weights[j], transposed[j],
// biases[j] and CELU alphas[j] as in Network, applied to atoms [starts[j], starts[j] +
// counts[j]).
// features (n, width); energies (members, n); gradients (members, n, width); rows that
// no network covers are left as they are.  Returns 0, or 1 (nothing touched) when the
// shapes disagree (see run_networks).  grad (members, n); out (n, in).
extern "C" {

int mlp_f32(int64_t count, int64_t members, const int64_t* layers, const int64_t* const* sizes,
            const float* const* const* weights, const float* const* const* transposed,
            const float* const* const* biases, const float* alphas, const FirstLayer* first, const int64_t* starts,
            const int64_t* counts, int64_t n, int64_t width, const float* features, float* energies, float* gradients,
            int threads) {
    return run_networks(count, members, layers, sizes, weights, transposed, biases, alphas, first, starts, counts, n,
                        width, features, energies, gradients, threads);
}

int mlp_f64(int64_t count, int64_t members, const int64_t* layers, const int64_t* const* sizes,
            const double* const* const* weights, const double* const* const* transposed,
            const double* const* const* biases, const double* alphas, const FirstLayer* first, const int64_t* starts,
            const int64_t* counts, int64_t n, int64_t width, const double* features, double* energies,
            double* gradients, int threads) {
    return run_networks(count, members, layers, sizes, weights, transposed, biases, alphas, first, starts, counts, n,
                        width, features, energies, gradients, threads);
}

void mlp_backward_f32(int64_t members, int64_t n, int64_t width, const float* grad, const float* gradients,
                      float* out) {
    contract(members, n, width, grad, gradients, out);
}

void mlp_backward_f64(int64_t members, int64_t n, int64_t width, const double* grad, const double* gradients,
                      double* out) {
    contract(members, n, width, grad, gradients, out);
}

}  // extern "C"
