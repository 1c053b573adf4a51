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
    int64_t total = 0;
    for (const auto& pairs : found) total += static_cast<int64_t>(pairs.size()) / 2;
    int64_t* result = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * std::max<int64_t>(1, 2 * total)));
    if (!result) return -1;
    int64_t k = 0;
    for (const auto& pairs : found)
        for (size_t i = 0; i < pairs.size(); i += 2, ++k) result[k] = pairs[i], result[total + k] = pairs[i + 1];
    *out = result;
    return total;
}

void neighbors_free(int64_t* pairs) { std::free(pairs); }

}  // extern "C"
