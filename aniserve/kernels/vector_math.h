// Vector variants of exp, expm1 and pow, for the kernels' loops.
//
// What glibc's <math.h> declares only under -ffast-math: these functions have vector
// variants in libmvec (x86-64; exp and pow since glibc 2.22, expm1 since 2.35), accurate
// to a few ulp like the scalar ones.  With -fno-math-errno, loops over them vectorize
// without the rest of -ffast-math (reassociation, no NaNs, flushed denormals).  The
// build defines ANISERVE_LIBMVEC only where it links libmvec.
#pragma once

#include <cmath>

#ifdef ANISERVE_LIBMVEC
extern "C" {
float expf(float) __attribute__((simd("notinbranch")));
float expm1f(float) __attribute__((simd("notinbranch")));
float powf(float, float) __attribute__((simd("notinbranch")));
double exp(double) __attribute__((simd("notinbranch")));
double expm1(double) __attribute__((simd("notinbranch")));
double pow(double, double) __attribute__((simd("notinbranch")));
}
#endif
