// The Python module lrkernels._C (built by setup.py only; CMake builds a plain shared library).
// `import lrkernels._C` loads the library, which runs the static TORCH_LIBRARY registrations;
// the module itself holds nothing.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
