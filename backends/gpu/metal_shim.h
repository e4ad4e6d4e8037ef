// Compiles the Metal Shading Language that xbitc generates (backends/gpu/render.py) as C++17 or later, so its
// kernels run on a CPU: a check of what they compute, not of whether Metal accepts them. Included through a file
// named metal_stdlib, so a generated source compiles unchanged (backends/gpu/metal_cpu.py builds it).
//
// Address spaces and `kernel` become nothing; `threadgroup` arrays become function statics, shared by the threads
// of the one workgroup that runs at a time; [[...]] attributes are C++ attributes the compiler ignores. The
// threads of a workgroup are fibers (ucontext) on one OS thread: each runs until it reaches a barrier or ends,
// then the next; a barrier is passed once every thread waits at it. A workgroup where some threads end while
// others wait at a barrier (undefined behaviour on a GPU) is reported, not run on.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstdlib>  // ::abs(int), which metal::abs(int) would make ambiguous
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

typedef unsigned int uint;
// float16 as its 16 bits with exact conversions (_Float16 is missing from older clang on x86); arithmetic on it
// happens in float.
struct half {
    uint16_t bits;
    half() = default;
    half(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
        if (a >= 0x7f800000u) {  // inf, nan
            bits = (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
        } else if (a >= 0x477ff000u) {  // rounds to >= 65520: inf
            bits = (uint16_t)(sign | 0x7c00u);
        } else if (a >= 0x38800000u) {  // normal: round to nearest even on the 13 dropped bits
            uint32_t m = a - 0x38000000u, r = (m >> 13) + (((m & 0x1fffu) > 0x1000u) || ((m & 0x3fffu) == 0x3000u));
            bits = (uint16_t)(sign | r);
        } else {  // subnormal or zero: value * 2^24 rounded to nearest even
            float v;
            std::memcpy(&v, &a, 4);
            bits = (uint16_t)(sign | (uint32_t)__builtin_nearbyintf(v * 16777216.0f));
        }
    }
    operator float() const {
        uint32_t sign = (uint32_t)(bits >> 15) << 31, e = (bits >> 10) & 31u, m = bits & 1023u, u;
        if (e == 31) {
            u = sign | 0x7f800000u | (m << 13);
        } else if (e) {
            u = sign | ((e + 112) << 23) | (m << 13);
        } else {
            float v = (float)m / 16777216.0f;
            std::memcpy(&u, &v, 4);
            u |= sign;
        }
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};
struct uint3 { uint x, y, z; };
struct half2 { half x, y; };
struct float4 {
    float x, y, z, w;
    float4() = default;
    float4(float a, float b, float c, float d) : x(a), y(b), z(c), w(d) {}
};
struct uint4 {
    uint x, y, z, w;
    uint4() = default;
    uint4(uint a, uint b, uint c, uint d) : x(a), y(b), z(c), w(d) {}
};

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
template <class T, class U> inline T as_type(U u) {
    static_assert(sizeof(T) == sizeof(U), "as_type between types of one size");
    T t;
    std::memcpy(&t, &u, sizeof t);
    return t;
}
inline float exp(float x) { return __builtin_expf(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float tanh(float x) { return __builtin_tanhf(x); }
inline float sin(float x) { return __builtin_sinf(x); }
inline float cos(float x) { return __builtin_cosf(x); }
inline float floor(float x) { return __builtin_floorf(x); }
inline float ceil(float x) { return __builtin_ceilf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a < b ? b : a; }
void threadgroup_barrier(mem_flags);
}  // namespace metal

namespace xbitc_cpu {
struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    int state;  // 0 runnable, 1 waiting at a barrier, 2 ended
    uint3 lid;
    uint lix;
};
struct Workgroup {
    ucontext_t main;
    std::vector<Fiber> fibers;
    int cur = 0;
    std::function<void(uint3, uint)> body;
};
inline Workgroup*& current() {
    static Workgroup* wg = nullptr;
    return wg;
}
inline void fiber_main() {
    Workgroup* g = current();
    Fiber& f = g->fibers[g->cur];
    g->body(f.lid, f.lix);
    f.state = 2;  // returning resumes uc_link, the scheduler
}
constexpr size_t STACK = 256 << 10;

// Runs body(group id, local id, local index) for every thread of a groups.x*y*z grid of wg-shaped workgroups;
// 0, or 1 where a barrier was not reached by every thread of a workgroup.
template <class F> int run_grid(uint3 groups, uint3 wg, F&& body) {
    Workgroup g;
    current() = &g;
    uint n = wg.x * wg.y * wg.z;
    g.fibers.resize(n);
    for (Fiber& f : g.fibers) f.stack.reset(new char[STACK]);
    for (uint z = 0; z < groups.z; z++)
        for (uint y = 0; y < groups.y; y++)
            for (uint x = 0; x < groups.x; x++) {
                uint3 wid = {x, y, z};
                g.body = [&](uint3 lid, uint lix) { body(wid, lid, lix); };
                for (uint i = 0; i < n; i++) {
                    Fiber& f = g.fibers[i];
                    f.lid = {i % wg.x, (i / wg.x) % wg.y, i / (wg.x * wg.y)};
                    f.lix = i;
                    f.state = 0;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.get();
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = &g.main;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                for (;;) {
                    uint ended = 0, waiting = 0;
                    for (uint i = 0; i < n; i++) {
                        Fiber& f = g.fibers[i];
                        if (f.state == 2) {
                            ended++;
                            continue;
                        }
                        g.cur = (int)i;
                        f.state = 0;
                        swapcontext(&g.main, &f.ctx);
                        f.state == 2 ? ended++ : waiting++;
                    }
                    if (!waiting) break;
                    if (ended) {
                        current() = nullptr;
                        return 1;
                    }
                }
            }
    current() = nullptr;
    return 0;
}
}  // namespace xbitc_cpu

inline void metal::threadgroup_barrier(mem_flags) {
    xbitc_cpu::Workgroup* g = xbitc_cpu::current();
    xbitc_cpu::Fiber& f = g->fibers[g->cur];
    f.state = 1;
    swapcontext(&f.ctx, &g->main);
}

#define kernel
#define device
#define constant const
#define threadgroup static
