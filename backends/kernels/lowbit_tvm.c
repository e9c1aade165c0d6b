/* lowbit.cpu_linear as a TVM FFI packed function in C (no Python in the call path).
 *
 * Arguments: x [M, K] float32, codes uint8 [NT, nb, bits, 2Gc], scales float32 [NT, ng, 16],
 * zeros uint8 [NT, ng, 16], out [M, N] float32 (destination-passing).  Calls lowbit_linear
 * (lowbit_cpu.c).  Built against the installed tvm-ffi's C header only when a TVM module needs it.
 */
#include <stdint.h>
#include <tvm/ffi/c_api.h>

int lowbit_linear(int bits, int M, int K, int Kp, int N, int G, const float *x, const uint8_t *codes,
                  const float *scales, const uint8_t *zeros, float *y, void *workspace);

static DLTensor *as_tensor(const TVMFFIAny *a) {
    if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor *)a->v_ptr;
    if (a->type_index == kTVMFFITensor) return (DLTensor *)((char *)a->v_obj + sizeof(TVMFFIObject));
    return NULL;
}

static int fail(const char *msg) {
    TVMFFIErrorSetRaisedFromCStr("ValueError", msg);
    return -1;
}

static int cpu_linear(void *self, const TVMFFIAny *args, int32_t n, TVMFFIAny *result) {
    (void)self;
    if (n != 5) return fail("lowbit.cpu_linear: expects (x, codes, scales, zeros, out)");
    DLTensor *t[5];
    for (int i = 0; i < 5; i++)
        if (!(t[i] = as_tensor(args + i))) return fail("lowbit.cpu_linear: arguments must be tensors");
    if (t[0]->ndim != 2 || t[1]->ndim != 4 || t[4]->ndim != 2) return fail("lowbit.cpu_linear: bad ranks");
    int M = (int)t[0]->shape[0], K = (int)t[0]->shape[1], ng = (int)t[1]->shape[1], bits = (int)t[1]->shape[2];
    int Kp = ng * ((int)t[1]->shape[3] / 2), N = (int)t[4]->shape[1]; /* codes: blocks of shape[3]/2 */
    int G = t[2]->ndim == 3 && t[2]->shape[1] > 0 ? Kp / (int)t[2]->shape[1] : 0; /* scales [NT, ng, 16] */
    char *base[5];
    for (int i = 0; i < 5; i++) base[i] = (char *)t[i]->data + t[i]->byte_offset;
    int rc = lowbit_linear(bits, M, K, Kp, N, G, (const float *)base[0], (const uint8_t *)base[1],
                           (const float *)base[2], (const uint8_t *)base[3], (float *)base[4], NULL);
    if (rc) return fail("lowbit.cpu_linear: bad operands (bits, K, N or group)");
    result->type_index = kTVMFFINone;
    result->v_int64 = 0;
    return 0;
}

/* Register the function globally (allow override); 0 on success. */
int lowbit_tvm_register(void) {
    TVMFFIObjectHandle f = NULL;
    if (TVMFFIFunctionCreate(NULL, cpu_linear, NULL, &f)) return -1;
    TVMFFIByteArray name = {"lowbit.cpu_linear", 17};
    int rc = TVMFFIFunctionSetGlobal(&name, f, 1);
    TVMFFIObjectDecRef(f);
    return rc;
}
