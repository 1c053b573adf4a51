// One serving step of a frozen ANI model, compiled: pairs → AEVs → every element
// network of every member (Δ corrections in the same pass) → the input gradient of the
// members' mean → the AEVs' gradient → forces and strain derivative, in one call.
//
// The autograd path (aniserve/potential.py) calls the same AEV and network kernels one by
// one, between them ~40 small tensor operations and an autograd graph: on a small
// molecule that fixed cost was three times the arithmetic.  Here the steps between the
// kernels (grouping atoms by element, selecting the AEV columns the element set can make
// nonzero, scattering gradients back) are plain loops over buffers that a thread keeps
// from one call to the next.  It computes the same terms in the same order as the
// autograd path does with the compiled kernels, so results agree to rounding.

#include <algorithm>
#include <cstdint>
#include <vector>

// The kernels of aev.cpp and mlp.cpp (same library).
struct Constants;
struct FirstLayer;
extern "C" {
int aev_forward_f32(const Constants*, int64_t, int64_t, const int64_t*, const int64_t*, const int64_t*, const float*,
                    float*, int);
int aev_forward_f64(const Constants*, int64_t, int64_t, const int64_t*, const int64_t*, const int64_t*,
                    const double*, double*, int);
int aev_backward_f32(const Constants*, int64_t, int64_t, const int64_t*, const int64_t*, const int64_t*,
                     const float*, const float*, float*, int);
int aev_backward_f64(const Constants*, int64_t, int64_t, const int64_t*, const int64_t*, const int64_t*,
                     const double*, const double*, double*, int);
int mlp_f32(int64_t, int64_t, const int64_t*, const int64_t* const*, const float* const* const*,
            const float* const* const*, const float* const* const*, const float*, const FirstLayer*, const int64_t*,
            const int64_t*, int64_t, int64_t, const float*, float*, float*, int);
int mlp_f64(int64_t, int64_t, const int64_t*, const int64_t* const*, const double* const* const*,
            const double* const* const*, const double* const* const*, const double*, const FirstLayer*,
            const int64_t*, const int64_t*, int64_t, int64_t, const double*, double*, double*, int);
void mlp_backward_f32(int64_t, int64_t, int64_t, const float*, const float*, float*);
void mlp_backward_f64(int64_t, int64_t, int64_t, const double*, const double*, double*);
}

namespace {

inline int aev_forward(const Constants* c, int64_t n, int64_t p, const int64_t* s, const int64_t* ce,
                       const int64_t* ne, const float* v, float* out, int t) {
    return aev_forward_f32(c, n, p, s, ce, ne, v, out, t);
}
inline int aev_forward(const Constants* c, int64_t n, int64_t p, const int64_t* s, const int64_t* ce,
                       const int64_t* ne, const double* v, double* out, int t) {
    return aev_forward_f64(c, n, p, s, ce, ne, v, out, t);
}
inline int aev_backward(const Constants* c, int64_t n, int64_t p, const int64_t* s, const int64_t* ce,
                        const int64_t* ne, const float* v, const float* g, float* out, int t) {
    return aev_backward_f32(c, n, p, s, ce, ne, v, g, out, t);
}
inline int aev_backward(const Constants* c, int64_t n, int64_t p, const int64_t* s, const int64_t* ce,
                        const int64_t* ne, const double* v, const double* g, double* out, int t) {
    return aev_backward_f64(c, n, p, s, ce, ne, v, g, out, t);
}
inline int mlp(int64_t count, int64_t members, const int64_t* layers, const int64_t* const* sizes,
               const void* const* w, const void* const* wt, const void* const* b, const float* alphas,
               const FirstLayer* first, const int64_t* starts, const int64_t* counts, int64_t n, int64_t width,
               const float* x, float* e, float* g, int t) {
    using P = const float* const* const*;
    return mlp_f32(count, members, layers, sizes, P(w), P(wt), P(b), alphas, first, starts, counts, n, width, x, e,
                   g, t);
}
inline int mlp(int64_t count, int64_t members, const int64_t* layers, const int64_t* const* sizes,
               const void* const* w, const void* const* wt, const void* const* b, const double* alphas,
               const FirstLayer* first, const int64_t* starts, const int64_t* counts, int64_t n, int64_t width,
               const double* x, double* e, double* g, int t) {
    using P = const double* const* const*;
    return mlp_f64(count, members, layers, sizes, P(w), P(wt), P(b), alphas, first, starts, counts, n, width, x, e,
                   g, t);
}
inline void contract(int64_t k, int64_t n, int64_t w, const float* g, const float* j, float* out) {
    mlp_backward_f32(k, n, w, g, j, out);
}
inline void contract(int64_t k, int64_t n, int64_t w, const double* g, const double* j, double* out) {
    mlp_backward_f64(k, n, w, g, j, out);
}

// A thread's buffers, kept between calls: a serving loop calls with the same shapes
// again and again, and reallocating (and faulting in) a few MB each step costs as much
// as a small molecule's arithmetic.
template <typename T>
struct Buffers {
    std::vector<T> vectors, aev, x, energies, jacobian, grad_x, grad_aev, grad_vectors, weights;
    std::vector<int64_t> order, count, start, net_start, net_count, group_of_species;
};

template <typename T>
Buffers<T>& buffers() {
    thread_local Buffers<T> b;
    return b;
}

template <typename T>
void fill_zero(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    std::fill(v.begin(), v.begin() + n, T(0));
}

// The AEV width, as aev.cpp computes it (the layout of Constants is mirrored here by its
// first fields, which aev_constants_layout's test holds to the struct).
struct ConstantsHead {
    int64_t num_species, num_shf_r, num_shf_a, num_shf_z, num_pairs;
};

// Returns 0; 1 when an index or size handed in is out of range (nothing written); 2
// when a kernel refuses (constants longer than the build allows, network widths that
// do not match the columns).
template <typename T>
int step(const Constants* constants, int64_t n_atoms, int64_t n_centers, int64_t n_pairs, const int64_t* species,
         const int64_t* center, const int64_t* neighbor, int64_t n_positions, const double* positions,
         const int64_t* position_of, const double* shift, const double* cell, const int64_t* structure,
         int64_t n_structures, int64_t count, int64_t members, const int64_t* layers, const int64_t* const* sizes,
         const void* const* weights, const void* const* transposed, const void* const* biases, const T* alphas,
         const FirstLayer* first, const int64_t* group_of, int64_t n_groups, const int64_t* group_species,
         const int64_t* columns, int64_t n_columns, double* member_energies, double* grad_positions,
         double* strain_grad, int threads) {
    const auto& head = *reinterpret_cast<const ConstantsHead*>(constants);
    const int64_t S = head.num_species;
    const int64_t width = S * head.num_shf_r + head.num_pairs * head.num_shf_a * head.num_shf_z;
    // Everything that indexes memory is checked first: no caller can make this read or
    // write out of bounds.
    if (n_atoms < 0 || n_centers < 0 || n_centers > n_atoms || n_pairs < 0 || n_structures < 1 || members < 1
        || count < 1 || n_groups < 1 || n_columns < 1 || n_columns > width)
        return 1;
    for (int64_t i = 0; i < n_atoms; ++i)
        if (species[i] < 0 || species[i] >= S) return 1;
    for (int64_t i = 0; i < n_centers; ++i)
        if (structure[i] < 0 || structure[i] >= n_structures) return 1;
    for (int64_t p = 0; p < n_pairs; ++p)
        if (center[p] < 0 || center[p] >= n_centers || neighbor[p] < 0 || neighbor[p] >= n_atoms
            || (p > 0 && center[p] < center[p - 1]))
            return 1;
    if (!position_of && n_atoms > n_positions) return 1;
    for (int64_t i = 0; position_of && i < n_atoms; ++i)
        if (position_of[i] < 0 || position_of[i] >= n_positions) return 1;
    for (int64_t j = 0; j < n_columns; ++j)
        if (columns[j] < 0 || columns[j] >= width) return 1;
    for (int64_t j = 0; j < count; ++j)
        if (group_of[j] < 0 || group_of[j] >= n_groups) return 1;

    Buffers<T>& b = buffers<T>();
    // Displacements r_j − r_i + shift·cell, formed in double and then rounded to T, so a
    // molecule far from the origin loses no precision in float32.
    if (b.vectors.size() < size_t(n_pairs * 3)) b.vectors.resize(n_pairs * 3);
    for (int64_t p = 0; p < n_pairs; ++p) {
        const double* ri = positions + 3 * (position_of ? position_of[center[p]] : center[p]);
        const double* rj = positions + 3 * (position_of ? position_of[neighbor[p]] : neighbor[p]);
        double v[3] = {rj[0] - ri[0], rj[1] - ri[1], rj[2] - ri[2]};
        if (shift) {
            const double* s = shift + 3 * p;
            const double* h = cell + 9 * structure[center[p]];
            for (int c = 0; c < 3; ++c) v[c] += s[0] * h[c] + s[1] * h[3 + c] + s[2] * h[6 + c];
        }
        for (int c = 0; c < 3; ++c) b.vectors[3 * p + c] = T(v[c]);
    }
    const T* vectors = b.vectors.data();
    // Centers grouped by element (a stable counting sort), in the order of the groups.
    b.group_of_species.assign(S, -1);
    for (int64_t g = 0; g < n_groups; ++g) {
        if (group_species[g] < 0 || group_species[g] >= S) return 1;
        b.group_of_species[group_species[g]] = g;
    }
    b.count.assign(n_groups, 0);
    for (int64_t i = 0; i < n_centers; ++i) {
        const int64_t g = b.group_of_species[species[i]];
        if (g < 0) return 1;  // an element without networks
        ++b.count[g];
    }
    b.start.assign(n_groups + 1, 0);
    for (int64_t g = 0; g < n_groups; ++g) b.start[g + 1] = b.start[g] + b.count[g];
    b.order.resize(n_centers);
    {
        std::vector<int64_t> next(b.start.begin(), b.start.end() - 1);
        for (int64_t i = 0; i < n_centers; ++i) b.order[next[b.group_of_species[species[i]]]++] = i;
    }
    b.net_start.resize(count), b.net_count.resize(count);
    for (int64_t j = 0; j < count; ++j) b.net_start[j] = b.start[group_of[j]], b.net_count[j] = b.count[group_of[j]];

    // AEVs, then the networks' inputs: grouped rows, only the columns they take.
    fill_zero(b.aev, size_t(n_atoms * width));
    if (aev_forward(constants, n_atoms, n_pairs, species, center, neighbor, vectors, b.aev.data(), threads)) return 2;
    const int64_t n = n_centers, C = n_columns;
    if (b.x.size() < size_t(n * C)) b.x.resize(n * C);
    for (int64_t r = 0; r < n; ++r) {
        const T* row = b.aev.data() + b.order[r] * width;
        T* out = b.x.data() + r * C;
        for (int64_t j = 0; j < C; ++j) out[j] = row[columns[j]];
    }
    if (b.energies.size() < size_t(members * n)) b.energies.resize(members * n);
    if (b.jacobian.size() < size_t(members * n * C)) b.jacobian.resize(members * n * C);
    if (mlp(count, members, layers, sizes, weights, transposed, biases, alphas, first, b.net_start.data(),
            b.net_count.data(), n, C, b.x.data(), b.energies.data(), b.jacobian.data(), threads))
        return 2;
    for (int64_t m = 0; m < members; ++m)
        for (int64_t r = 0; r < n; ++r)
            member_energies[m * n_structures + structure[b.order[r]]] += double(b.energies[m * n + r]);

    // The members' mean: each member's input gradient weighs 1/k.
    b.weights.assign(members * n, T(1) / T(members));
    if (b.grad_x.size() < size_t(n * C)) b.grad_x.resize(n * C);
    contract(members, n, C, b.weights.data(), b.jacobian.data(), b.grad_x.data());
    fill_zero(b.grad_aev, size_t(n_atoms * width));
    for (int64_t r = 0; r < n; ++r) {
        T* row = b.grad_aev.data() + b.order[r] * width;
        const T* g = b.grad_x.data() + r * C;
        for (int64_t j = 0; j < C; ++j) row[columns[j]] = g[j];
    }
    fill_zero(b.grad_vectors, size_t(n_pairs * 3));
    if (aev_backward(constants, n_atoms, n_pairs, species, center, neighbor, vectors, b.grad_aev.data(),
                     b.grad_vectors.data(), threads))
        return 2;

    // A vector is r_neighbor − r_center (+ shift·cell): its gradient goes to both atoms;
    // under the strain r → r(I+ε) it moves to v(I+ε), so ∂E/∂ε_ab = Σ_pairs v_a g_b.
    for (int64_t p = 0; p < n_pairs; ++p) {
        const T* g = b.grad_vectors.data() + 3 * p;
        double* gc = grad_positions + 3 * center[p];
        double* gn = grad_positions + 3 * neighbor[p];
        for (int k = 0; k < 3; ++k) gn[k] += double(g[k]), gc[k] -= double(g[k]);
        if (strain_grad) {
            double* e = strain_grad + 9 * structure[center[p]];
            const T* v = vectors + 3 * p;
            for (int a = 0; a < 3; ++a)
                for (int c = 0; c < 3; ++c) e[3 * a + c] += double(v[a]) * double(g[c]);
        }
    }
    return 0;
}

}  // namespace

// n_atoms atoms (the first n_centers are centers, the rest neighbours their pairs
// reach) and their model species; pairs (center, neighbor) sorted by center, whose
// vectors are r_neighbor − r_center (+ shift·cell): atom i is at
// positions[position_of[i]] (of n_positions, Å; position_of null: at positions[i]),
// shift (n_pairs, 3) holds integer image offsets and cell (n_structures, 3, 3) lattice
// vectors as rows, both null for isolated structures; structure of each atom; count
// networks as mlp_* takes them, network j applied to the centers of group group_of[j],
// group g being those of species group_species[g]; the AEV columns the networks take.
// Adds the member energies (members, n_structures), the gradient of their mean with
// respect to the positions (n_atoms, 3) and, when strain_grad is not null, to the
// strain (n_structures, 3, 3).
extern "C" {

int ani_step_f32(const Constants* c, int64_t n_atoms, int64_t n_centers, int64_t n_pairs, const int64_t* species,
                 const int64_t* center, const int64_t* neighbor, int64_t n_positions, const double* positions,
                 const int64_t* position_of, const double* shift, const double* cell, const int64_t* structure,
                 int64_t n_structures, int64_t count, int64_t members, const int64_t* layers,
                 const int64_t* const* sizes, const void* const* weights, const void* const* transposed,
                 const void* const* biases, const float* alphas, const FirstLayer* first, const int64_t* group_of,
                 int64_t n_groups,
                 const int64_t* group_species, const int64_t* columns, int64_t n_columns, double* member_energies,
                 double* grad_positions, double* strain_grad, int threads) {
    return step<float>(c, n_atoms, n_centers, n_pairs, species, center, neighbor, n_positions, positions,
                       position_of, shift, cell, structure, n_structures, count, members, layers, sizes, weights,
                       transposed, biases, alphas, first, group_of, n_groups, group_species, columns, n_columns,
                       member_energies, grad_positions, strain_grad, threads);
}

int ani_step_f64(const Constants* c, int64_t n_atoms, int64_t n_centers, int64_t n_pairs, const int64_t* species,
                 const int64_t* center, const int64_t* neighbor, int64_t n_positions, const double* positions,
                 const int64_t* position_of, const double* shift, const double* cell, const int64_t* structure,
                 int64_t n_structures, int64_t count, int64_t members, const int64_t* layers,
                 const int64_t* const* sizes, const void* const* weights, const void* const* transposed,
                 const void* const* biases, const double* alphas, const FirstLayer* first, const int64_t* group_of,
                 int64_t n_groups,
                 const int64_t* group_species, const int64_t* columns, int64_t n_columns, double* member_energies,
                 double* grad_positions, double* strain_grad, int threads) {
    return step<double>(c, n_atoms, n_centers, n_pairs, species, center, neighbor, n_positions, positions,
                        position_of, shift, cell, structure, n_structures, count, members, layers, sizes, weights,
                        transposed, biases, alphas, first, group_of, n_groups, group_species, columns, n_columns,
                        member_energies, grad_positions, strain_grad, threads);
}

}  // extern "C"
