// Makes the ahead-of-time library an importable Python extension, fastreg._C, as setuptools
// expects. It holds no Python API: the ops register themselves with the dispatcher
// (TORCH_LIBRARY_IMPL) when fastreg/_loader.py loads the file with torch.ops.load_library.
// Packaging glue only, so it is not in sources.txt: the JIT and CMake builds do not need it.
#include <Python.h>

namespace {
PyModuleDef fastreg_c_module = {
    PyModuleDef_HEAD_INIT,
    "fastreg._C",
    "fastreg's compiled kernels; loaded through torch.ops.load_library, not used as a module.",
    -1,
    nullptr,
};
}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&fastreg_c_module); }
