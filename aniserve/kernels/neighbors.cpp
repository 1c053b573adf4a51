// Cell-list pair search: the contract of aniserve/neighbors.py's _cell_list, compiled.
//
// Pairs (query q, source s) with |source_s − query_q| ≤ cutoff, sorted by query (and by
// bin, then source, within a query), except a source that is the query atom itself
// (source_atom[s] == q with central[s]: the periodic search's sources are images, and
// only the unshifted one is the atom itself).  Sources are binned into cubes of side
// cutoff, hashed by sorting their bin ids, so sparse or far-flung systems need no dense
// grid; each query looks in the 27 bins around its own.  Queries run in chunks across
// torch's OpenMP threads (see aev.cpp), each chunk's pairs kept in order.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// The per-chunk results (``width`` values per pair, interleaved) as one malloc'ed
// (width, P) array in *out, rows one after the other; P, or −1 when out of memory.
int64_t gather(const std::vector<std::vector<int64_t>>& found, int width, int64_t** out) {
    int64_t total = 0;
    for (const auto& pairs : found) total += static_cast<int64_t>(pairs.size()) / width;
    int64_t* result = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * std::max<int64_t>(1, width * total)));
    if (!result) return -1;
    int64_t k = 0;
    for (const auto& pairs : found)
        for (size_t p = 0; p < pairs.size(); p += width, ++k)
            for (int r = 0; r < width; ++r) result[r * total + k] = pairs[p + r];
    *out = result;
    return total;
}

struct Grid {
    double origin[3], cutoff;
    int64_t dims[3];  // bins per axis, with a margin of one on each side

    int64_t bin(const double* x, int axis) const {
        return static_cast<int64_t>(std::floor((x[axis] - origin[axis]) / cutoff)) + 1;
    }
    int64_t id(int64_t bx, int64_t by, int64_t bz) const { return (bz * dims[1] + by) * dims[0] + bx; }
};

}  // namespace

extern "C" {

// Returns the number of pairs P and sets *out to a malloc'ed (2, P) int64 array: query
// indices, then source indices; free it with neighbors_free.  −1 when out of memory.
int64_t neighbors_cell_list(int64_t n_queries, const double* queries, int64_t n_sources, const double* sources,
                            const int64_t* source_atom, const uint8_t* central, double cutoff, int threads,
                            int64_t** out) {
    *out = nullptr;
    Grid grid;
    grid.cutoff = cutoff;
    for (int a = 0; a < 3; ++a) {
        double low = INFINITY, high = -INFINITY;
        for (int64_t i = 0; i < n_sources; ++i) low = std::min(low, sources[3 * i + a]), high = std::max(high, sources[3 * i + a]);
        for (int64_t i = 0; i < n_queries; ++i) low = std::min(low, queries[3 * i + a]), high = std::max(high, queries[3 * i + a]);
        grid.origin[a] = n_sources + n_queries ? low : 0.0;
        grid.dims[a] = (n_sources + n_queries ? static_cast<int64_t>(std::floor((high - low) / cutoff)) : 0) + 3;
    }
    // Sources sorted by bin id: a bin is then a run, found by binary search.
    std::vector<std::pair<int64_t, int64_t>> binned(n_sources);
    for (int64_t s = 0; s < n_sources; ++s) {
        const double* x = sources + 3 * s;
        binned[s] = {grid.id(grid.bin(x, 0), grid.bin(x, 1), grid.bin(x, 2)), s};
    }
    std::sort(binned.begin(), binned.end());

    const double cutoff2 = cutoff * cutoff;
    const int64_t chunk = 256;
    const int64_t chunks = (n_queries + chunk - 1) / chunk;
    std::vector<std::vector<int64_t>> found(chunks);  // per chunk: (q, s) interleaved
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, chunks)));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        std::vector<int64_t>& pairs = found[c];
        for (int64_t q = c * chunk; q < std::min(n_queries, (c + 1) * chunk); ++q) {
            const double* x = queries + 3 * q;
            const int64_t bx = grid.bin(x, 0), by = grid.bin(x, 1), bz = grid.bin(x, 2);
            for (int64_t dz = -1; dz <= 1; ++dz)
                for (int64_t dy = -1; dy <= 1; ++dy)
                    for (int64_t dx = -1; dx <= 1; ++dx) {
                        const int64_t target = grid.id(bx + dx, by + dy, bz + dz);
                        auto it = std::lower_bound(binned.begin(), binned.end(), std::make_pair(target, int64_t(-1)));
                        for (; it != binned.end() && it->first == target; ++it) {
                            const int64_t s = it->second;
                            const double* y = sources + 3 * s;
                            const double d0 = y[0] - x[0], d1 = y[1] - x[1], d2 = y[2] - x[2];
                            if (d0 * d0 + d1 * d1 + d2 * d2 > cutoff2) continue;
                            if (source_atom[s] == q && central[s]) continue;
                            pairs.push_back(q);
                            pairs.push_back(s);
                        }
                    }
        }
    }
    return gather(found, 2, out);
}

// Periodic pairs without images: the cell (rows are lattice vectors, ``inverse`` its
// inverse) is cut into n_a ≥ 3 bins along each lattice direction, each at least
// ``cutoff`` wide between its faces, so every neighbour of an atom lies in the 27 bins
// around its own, counted modulo n_a; the bin step that wraps gives the image.  (A point
// within the cutoff is within cutoff/width_a of x in fractional coordinate a, whatever
// the cell's angles.)  Returns the number of pairs P and sets *out to a malloc'ed (5, P)
// int64 array: centres, neighbours, and the integer shift of the neighbour's image in
// lattice vectors (x, y, z rows), such that pos[j] + shift·cell − pos[i] is the pair's
// vector for the caller's (unwrapped) positions; sorted by centre.  −1: out of memory;
// −2: an atom's fractional coordinate too large to wrap exactly (|s| ≥ 2⁵²); −3: the
// cell has room for fewer than three bins along some direction (the caller then builds
// images: aniserve/neighbors.py).
int64_t neighbors_periodic(int64_t n, const double* positions, const double* cell, const double* inverse, double cutoff,
                           int threads, int64_t** out) {
    *out = nullptr;
    double cross[3][3], volume = 0.0;
    for (int a = 0; a < 3; ++a) {
        const double* u = cell + 3 * ((a + 1) % 3);
        const double* v = cell + 3 * ((a + 2) % 3);
        cross[a][0] = u[1] * v[2] - u[2] * v[1];
        cross[a][1] = u[2] * v[0] - u[0] * v[2];
        cross[a][2] = u[0] * v[1] - u[1] * v[0];
    }
    for (int k = 0; k < 3; ++k) volume += cell[k] * cross[0][k];
    volume = std::fabs(volume);
    int64_t bins[3];
    for (int a = 0; a < 3; ++a) {
        const double width = volume / std::sqrt(cross[a][0] * cross[a][0] + cross[a][1] * cross[a][1] + cross[a][2] * cross[a][2]);
        const double fit = std::floor(width / cutoff);
        if (!(fit >= 3.0)) return -3;
        bins[a] = static_cast<int64_t>(std::min(fit, 1024.0));
    }
    // A sparse box need not have a bin per cutoff³: bins no more than ~4 per atom (wider
    // bins are still correct, only with more candidates).
    const double cap = std::max(27.0, 4.0 * static_cast<double>(n));
    while (static_cast<double>(bins[0]) * bins[1] * bins[2] > cap) {
        int widest = 0;
        for (int a = 1; a < 3; ++a)
            if (bins[a] > bins[widest]) widest = a;
        if (bins[widest] <= 3) break;
        bins[widest] = std::max<int64_t>(3, bins[widest] * 3 / 4);
    }
    const int64_t total_bins = bins[0] * bins[1] * bins[2];

    // Wrapped fractional coordinates, the integer wrap of each atom, its bin.
    std::vector<double> wrapped(3 * n);  // Cartesian, inside the cell
    std::vector<int64_t> wrap(3 * n), bin_of(n);
    for (int64_t i = 0; i < n; ++i) {
        int64_t b[3];
        double f[3];
        for (int a = 0; a < 3; ++a) {
            const double s = positions[3 * i] * inverse[a] + positions[3 * i + 1] * inverse[3 + a] +
                             positions[3 * i + 2] * inverse[6 + a];
            if (!(std::fabs(s) < 4503599627370496.0)) return -2;
            const double w = -std::floor(s);
            wrap[3 * i + a] = static_cast<int64_t>(w);
            f[a] = s + w;
            b[a] = std::min<int64_t>(bins[a] - 1, std::max<int64_t>(0, static_cast<int64_t>(std::floor(f[a] * bins[a]))));
        }
        for (int k = 0; k < 3; ++k) wrapped[3 * i + k] = f[0] * cell[k] + f[1] * cell[3 + k] + f[2] * cell[6 + k];
        bin_of[i] = (b[2] * bins[1] + b[1]) * bins[0] + b[0];
    }
    // Atoms sorted by bin (counting sort): bin t holds order[start[t] .. start[t + 1]).
    std::vector<int64_t> start(total_bins + 1, 0), order(n);
    for (int64_t i = 0; i < n; ++i) ++start[bin_of[i] + 1];
    for (int64_t t = 0; t < total_bins; ++t) start[t + 1] += start[t];
    {
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t i = 0; i < n; ++i) order[fill[bin_of[i]]++] = i;
    }

    const double cutoff2 = cutoff * cutoff;
    const int64_t chunk = 256;
    const int64_t chunks = (n + chunk - 1) / chunk;
    std::vector<std::vector<int64_t>> found(chunks);  // per chunk: (i, j, sx, sy, sz) interleaved
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, chunks)));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        std::vector<int64_t>& pairs = found[c];
        for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) {
            const int64_t own = bin_of[i];
            const int64_t b[3] = {own % bins[0], (own / bins[0]) % bins[1], own / (bins[0] * bins[1])};
            const double* x = wrapped.data() + 3 * i;
            for (int64_t dz = -1; dz <= 1; ++dz)
                for (int64_t dy = -1; dy <= 1; ++dy)
                    for (int64_t dx = -1; dx <= 1; ++dx) {
                        const int64_t step[3] = {dx, dy, dz};
                        int64_t t[3], image[3];
                        for (int a = 0; a < 3; ++a) {
                            const int64_t raw = b[a] + step[a];
                            image[a] = raw < 0 ? -1 : (raw >= bins[a] ? 1 : 0);
                            t[a] = raw - image[a] * bins[a];
                        }
                        double offset[3];
                        for (int k = 0; k < 3; ++k)
                            offset[k] = image[0] * cell[k] + image[1] * cell[3 + k] + image[2] * cell[6 + k] - x[k];
                        const int64_t target = (t[2] * bins[1] + t[1]) * bins[0] + t[0];
                        const bool same_image = image[0] == 0 && image[1] == 0 && image[2] == 0;
                        for (int64_t k = start[target]; k < start[target + 1]; ++k) {
                            const int64_t j = order[k];
                            if (j == i && same_image) continue;
                            const double* y = wrapped.data() + 3 * j;
                            const double d0 = y[0] + offset[0], d1 = y[1] + offset[1], d2 = y[2] + offset[2];
                            if (d0 * d0 + d1 * d1 + d2 * d2 > cutoff2) continue;
                            pairs.push_back(i);
                            pairs.push_back(j);
                            for (int a = 0; a < 3; ++a) pairs.push_back(image[a] + wrap[3 * j + a] - wrap[3 * i + a]);
                        }
                    }
        }
    }
    return gather(found, 5, out);
}

void neighbors_free(int64_t* pairs) { std::free(pairs); }

}  // extern "C"
