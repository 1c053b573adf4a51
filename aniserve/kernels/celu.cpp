// CELU and its derivative in one pass, for the element networks' written-out gradient
// (aniserve/networks.py, _FrozenMLP): a = CELU(z) = max(z, 0) + min(0, α·expm1(z/α)) and
// a' = exp(min(z, 0)/α).  Two tensor operations would each make their own pass, with
// their fixed costs, over the same small arrays.

#include <cmath>
#include <cstdint>

#ifdef ANISERVE_LIBMVEC
extern "C" {  // vector variants in libmvec (see aev.cpp)
float expf(float) __attribute__((simd("notinbranch")));
float expm1f(float) __attribute__((simd("notinbranch")));
double exp(double) __attribute__((simd("notinbranch")));
double expm1(double) __attribute__((simd("notinbranch")));
}
#endif

namespace {

template <typename T>
void celu(int64_t n, const T* __restrict z, T alpha, T* __restrict a, T* __restrict slope) {
    const T inverse = T(1) / alpha;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const T zi = z[i];
        const T negative = (zi < 0 ? zi : T(0)) * inverse;
        a[i] = (zi > 0 ? zi : T(0)) + alpha * std::expm1(negative);
        slope[i] = std::exp(negative);
    }
}

}  // namespace

extern "C" {

void celu_f32(int64_t n, const float* z, float alpha, float* a, float* slope) { celu(n, z, alpha, a, slope); }

void celu_f64(int64_t n, const double* z, double alpha, double* a, double* slope) { celu(n, z, alpha, a, slope); }

}  // extern "C"
