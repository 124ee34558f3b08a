/* A stand-in libcuda.so.1 for machines without a GPU: the CUDA driver calls trims makes,
 * by their exported names and C signatures, over host memory. An allocation is a memfd,
 * exported and imported as a file descriptor as the VMM API does; a mapping is an mmap of it
 * at a reserved address, its access set with mprotect (so a write to a read-only mapping
 * faults); copies are memcpy. Calls that need a current context (copies, streams, events,
 * synchronize, pinned memory) fail without one, and each thread has its own context stack,
 * so that trims' bindings are tested where ctypes meets the ABI: symbol names, argument
 * passing, struct layouts (checked field by field), handle and descriptor lifetimes, and
 * which context each call leaves current. Not simulated: anything of a real GPU's timing.
 *
 * Built by tests/test_cuda_binding.py: gcc -shared -fPIC -o libcuda.so.1 fake_libcuda.c
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUhandle;

enum { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101, INVALID_CONTEXT = 201 };

typedef struct { int type; int id; } Location;
typedef struct {
    int type;                 /* CU_MEM_ALLOCATION_TYPE_PINNED = 1 */
    int requestedHandleTypes; /* CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1 */
    Location location;        /* CU_MEM_LOCATION_TYPE_DEVICE = 1, ordinal */
    void *win32HandleMetaData;
    unsigned char allocFlags[8];
} AllocationProp;
typedef struct { Location location; int flags; } AccessDesc;

typedef struct { int fd; size_t size; } Allocation;
typedef struct { int device; } Context;

static Context contexts[16];
static int live_handles;  /* allocations and imports not yet released */
static __thread Context *stack[16];
static __thread int depth;

static int devices(void) {
    const char *n = getenv("FAKE_CUDA_DEVICES");
    return n ? atoi(n) : 2;
}
static size_t granularity(void) { return 2u << 20; }
static Context *current(void) { return depth ? stack[depth - 1] : NULL; }
static int valid_location(const Location *l) { return l->type == 1 && l->id >= 0 && l->id < devices(); }
static int valid_prop(const AllocationProp *p) {
    return p->type == 1 && p->requestedHandleTypes == 1 && valid_location(&p->location)
           && p->win32HandleMetaData == NULL;
}

/* For the tests: what trims has not released, and the context current in this thread. */
int fakecuda_live_handles(void) { return __atomic_load_n(&live_handles, __ATOMIC_SEQ_CST); }
int fakecuda_current_device(void) { return current() ? current()->device : -1; }

CUresult cuInit(unsigned flags) { return flags == 0 ? OK : INVALID_VALUE; }
CUresult cuDeviceGetCount(int *count) { *count = devices(); return OK; }
CUresult cuDeviceGet(int *device, int ordinal) {
    if (ordinal < 0 || ordinal >= devices()) return INVALID_DEVICE;
    *device = ordinal;
    return OK;
}
CUresult cuDeviceGetUuid_v2(unsigned char uuid[16], int device) {
    if (device < 0 || device >= devices()) return INVALID_DEVICE;
    for (int i = 0; i < 16; i++) uuid[i] = (unsigned char)(0x10 * device + i);
    return OK;
}
CUresult cuDeviceGetUuid(unsigned char uuid[16], int device) { return cuDeviceGetUuid_v2(uuid, device); }
CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
    if (device < 0 || device >= devices()) return INVALID_DEVICE;
    *value = (attribute == 102 || attribute == 103);  /* VMM, POSIX descriptors */
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void **context, int device) {
    if (device < 0 || device >= devices()) return INVALID_DEVICE;
    contexts[device].device = device;
    *context = &contexts[device];
    return OK;
}
CUresult cuCtxSetCurrent(void *context) {
    if (context == NULL) { if (depth) depth--; return OK; }
    if (depth == 0) depth = 1;
    stack[depth - 1] = context;
    return OK;
}
CUresult cuCtxGetCurrent(void **context) { *context = current(); return OK; }
CUresult cuCtxPushCurrent_v2(void *context) {
    if (context == NULL || depth == 16) return INVALID_VALUE;
    stack[depth++] = context;
    return OK;
}
CUresult cuCtxPopCurrent_v2(void **context) {
    if (depth == 0) return INVALID_CONTEXT;
    Context *popped = stack[--depth];
    if (context) *context = popped;
    return OK;
}
CUresult cuCtxSynchronize(void) { return current() ? OK : INVALID_CONTEXT; }

CUresult cuMemGetAllocationGranularity(size_t *value, const AllocationProp *prop, int option) {
    if (!valid_prop(prop) || (option != 0 && option != 1)) return INVALID_VALUE;
    *value = granularity();
    return OK;
}
static CUhandle new_handle(int fd, size_t size) {
    Allocation *a = malloc(sizeof *a);
    a->fd = fd;
    a->size = size;
    __atomic_add_fetch(&live_handles, 1, __ATOMIC_SEQ_CST);
    return (CUhandle)(uintptr_t)a;
}
CUresult cuMemCreate(CUhandle *handle, size_t size, const AllocationProp *prop, unsigned long long flags) {
    if (!valid_prop(prop) || flags || size == 0 || size % granularity()) return INVALID_VALUE;
    int fd = memfd_create("fake-cuda", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) < 0) return OUT_OF_MEMORY;
    *handle = new_handle(fd, size);
    return OK;
}
CUresult cuMemRelease(CUhandle handle) {
    Allocation *a = (Allocation *)(uintptr_t)handle;
    close(a->fd);
    free(a);
    __atomic_sub_fetch(&live_handles, 1, __ATOMIC_SEQ_CST);
    return OK;
}
CUresult cuMemExportToShareableHandle(void *shareable, CUhandle handle, int type, unsigned long long flags) {
    if (type != 1 || flags) return INVALID_VALUE;
    int fd = dup(((Allocation *)(uintptr_t)handle)->fd);
    if (fd < 0) return OUT_OF_MEMORY;
    *(int *)shareable = fd;
    return OK;
}
CUresult cuMemImportFromShareableHandle(CUhandle *handle, void *os_handle, int type) {
    struct stat st;
    int fd = (int)(intptr_t)os_handle;
    if (type != 1 || fstat(fd, &st) < 0) return INVALID_VALUE;
    int mine = dup(fd);  /* the caller keeps and closes its own descriptor */
    if (mine < 0) return OUT_OF_MEMORY;
    *handle = new_handle(mine, (size_t)st.st_size);
    return OK;
}
CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags) {
    if (size == 0 || size % granularity() || alignment || addr || flags) return INVALID_VALUE;
    void *p = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return OUT_OF_MEMORY;
    *ptr = (CUdeviceptr)(uintptr_t)p;
    return OK;
}
CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    return munmap((void *)(uintptr_t)ptr, size) == 0 ? OK : INVALID_VALUE;
}
CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUhandle handle, unsigned long long flags) {
    Allocation *a = (Allocation *)(uintptr_t)handle;
    if (flags || offset + size > a->size) return INVALID_VALUE;
    void *p = mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, a->fd, (off_t)offset);
    return p == MAP_FAILED ? INVALID_VALUE : OK;
}
CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const AccessDesc *desc, size_t count) {
    if (count != 1 || !valid_location(&desc->location)) return INVALID_VALUE;
    int prot = desc->flags == 1 ? PROT_READ : desc->flags == 3 ? PROT_READ | PROT_WRITE : -1;
    if (prot < 0) return INVALID_VALUE;
    return mprotect((void *)(uintptr_t)ptr, size, prot) == 0 ? OK : INVALID_VALUE;
}
CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {  /* the range stays reserved, as the driver's does */
    void *p = mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                   -1, 0);
    return p == MAP_FAILED ? INVALID_VALUE : OK;
}

CUresult cuMemHostAlloc(void **pointer, size_t size, unsigned flags) {
    if (!current()) return INVALID_CONTEXT;
    if (flags) return INVALID_VALUE;
    *pointer = malloc(size);
    return *pointer ? OK : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void *pointer) { free(pointer); return OK; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *stream) {
    if (!current() || !stream) return INVALID_CONTEXT;
    memcpy((void *)(uintptr_t)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    if (!current()) return INVALID_CONTEXT;
    memcpy(dst, (const void *)(uintptr_t)src, n);
    return OK;
}
CUresult cuStreamCreate(void **stream, unsigned flags) {
    if (!current()) return INVALID_CONTEXT;
    *stream = malloc(1);
    return flags == 1 ? OK : INVALID_VALUE;
}
CUresult cuStreamDestroy_v2(void *stream) { free(stream); return OK; }
CUresult cuStreamSynchronize(void *stream) { return stream ? OK : INVALID_VALUE; }
CUresult cuEventCreate(void **event, unsigned flags) {
    if (!current()) return INVALID_CONTEXT;
    *event = malloc(1);
    return flags == 2 ? OK : INVALID_VALUE;
}
CUresult cuEventDestroy_v2(void *event) { free(event); return OK; }
CUresult cuEventRecord(void *event, void *stream) { return event && stream ? OK : INVALID_VALUE; }
CUresult cuEventSynchronize(void *event) { return event ? OK : INVALID_VALUE; }

CUresult cuGetErrorString(CUresult error, const char **text) {
    switch (error) {
    case OK: *text = "no error"; break;
    case INVALID_VALUE: *text = "invalid argument"; break;
    case OUT_OF_MEMORY: *text = "out of memory"; break;
    case INVALID_DEVICE: *text = "invalid device ordinal"; break;
    case INVALID_CONTEXT: *text = "invalid device context"; break;
    default: *text = NULL; return INVALID_VALUE;
    }
    return OK;
}
