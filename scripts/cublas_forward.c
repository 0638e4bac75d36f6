/*
 * libcublas.so.12 that forwards to cuBLAS 13.
 *
 * faiss-gpu 1.15.1 (PyPI, built for CUDA 12) calls exactly eight cuBLAS functions, all bound to
 * the version node "libcublas.so.12". This library defines those eight under that node and
 * forwards each call to the node's libcublas.so.13, whose signatures and enum values for these
 * calls are unchanged (checked against cublas_api.h of nvidia-cublas 13.10). That replaces a
 * 580 MB cuBLAS 12 download on offline CUDA 13 machines.
 *
 * libcublas.so.13 is looked for in: $CUBLAS13_PATH, this library's own folder (the bundle's
 * install step links it there), then the loader's usual search. Built by scripts/gpu_bundle.py:
 *   gcc -shared -fPIC -O2 -Wl,-soname,libcublas.so.12 -Wl,--version-script=MAP -o libcublas.so.12 THIS -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int status_t;           /* cublasStatus_t */
typedef void *handle_t;         /* cublasHandle_t */
enum { STATUS_NOT_INITIALIZED = 1 };

static void *lib;
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* dlopen by real path: cuBLAS finds libcublasLt.so.13 through $ORIGIN, which a symlink's folder breaks */
static void *open_real(const char *path) {
    char *real = realpath(path, NULL);
    void *handle = real ? dlopen(real, RTLD_NOW | RTLD_GLOBAL) : NULL;
    free(real);
    return handle;
}

static void open_cublas13(void) {
    const char *env = getenv("CUBLAS13_PATH");
    if (env && *env && (lib = open_real(env)))
        return;
    Dl_info info;
    if (dladdr((void *)&open_cublas13, &info) && info.dli_fname) {
        char path[4096];
        const char *slash = strrchr(info.dli_fname, '/');
        size_t dir = slash ? (size_t)(slash - info.dli_fname) + 1 : 0;
        if (dir + sizeof "libcublas.so.13" <= sizeof path) {
            memcpy(path, info.dli_fname, dir);
            strcpy(path + dir, "libcublas.so.13");
            if ((lib = open_real(path)))
                return;
        }
    }
    lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
        fprintf(stderr,
                "libcublas.so.12 (forwarder to cuBLAS 13): cannot load libcublas.so.13: %s\n"
                "  set CUBLAS13_PATH to it, or run scripts/gpu_bundle.py install again\n",
                dlerror());
}

static void *resolve(const char *name) {
    pthread_once(&once, open_cublas13);
    if (!lib)
        return NULL;
    void *f = dlvsym(lib, name, "libcublas.so.13");
    if (!f)
        f = dlsym(lib, name);
    if (!f)
        fprintf(stderr, "libcublas.so.12 (forwarder to cuBLAS 13): %s is missing from libcublas.so.13\n", name);
    return f;
}

/* One forwarding definition: resolve once, then call through the pointer. */
#define FORWARD(name, params, args)                                   \
    status_t name params {                                            \
        static status_t(*fn) params;                                  \
        if (!fn)                                                      \
            fn = (status_t(*) params)resolve(#name);                  \
        return fn ? fn args : STATUS_NOT_INITIALIZED;                 \
    }

FORWARD(cublasCreate_v2, (handle_t * handle), (handle))
FORWARD(cublasDestroy_v2, (handle_t handle), (handle))
FORWARD(cublasSetStream_v2, (handle_t handle, void *stream), (handle, stream))
FORWARD(cublasSetMathMode, (handle_t handle, int mode), (handle, mode))
FORWARD(cublasGetMathMode, (handle_t handle, int *mode), (handle, mode))
FORWARD(cublasSgemmEx,
        (handle_t h, int ta, int tb, int m, int n, int k, const float *alpha, const void *A, int Atype,
         int lda, const void *B, int Btype, int ldb, const float *beta, void *C, int Ctype, int ldc),
        (h, ta, tb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc))
FORWARD(cublasGemmEx,
        (handle_t h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int Atype,
         int lda, const void *B, int Btype, int ldb, const void *beta, void *C, int Ctype, int ldc,
         int computeType, int algo),
        (h, ta, tb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo))
FORWARD(cublasGemmStridedBatchedEx,
        (handle_t h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int Atype,
         int lda, long long strideA, const void *B, int Btype, int ldb, long long strideB, const void *beta,
         void *C, int Ctype, int ldc, long long strideC, int batchCount, int computeType, int algo),
        (h, ta, tb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB, beta, C, Ctype, ldc,
         strideC, batchCount, computeType, algo))
