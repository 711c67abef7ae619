// What both bindings export about the plan tables, from csrc/robustmerge/plan_tables.h, so
// the column names and dtype codes are written once (checked by backends/base.py at load).
#pragma once

#include <pybind11/pybind11.h>

#include "robustmerge/dtype.h"
#include "robustmerge/plan_tables.h"

namespace robustmerge_bindings {

inline void add_table_schema(pybind11::module_& m) {
  namespace py = pybind11;
  namespace rm = robustmerge;
  // static_cast, not size_t(...): clang reads "py::tuple items(size_t(rm::kItemCols))" as a function declaration
  py::tuple items(static_cast<size_t>(rm::kItemCols)), modules(static_cast<size_t>(rm::kModCols));
  for (size_t i = 0; i < size_t(rm::kItemCols); ++i) items[i] = py::str(rm::kItemColumnNames[i]);
  for (size_t i = 0; i < size_t(rm::kModCols); ++i) modules[i] = py::str(rm::kModuleColumnNames[i]);
  m.attr("ITEM_COLUMNS") = items;
  m.attr("MODULE_COLUMNS") = modules;
  m.attr("DTYPES") = py::dict(py::arg("float32") = int(rm::kF32), py::arg("float16") = int(rm::kF16),
                              py::arg("bfloat16") = int(rm::kBF16), py::arg("float64") = int(rm::kF64));
  m.attr("STATUS") = py::dict(py::arg("ok") = int(rm::kOk), py::arg("a_non_finite") = int(rm::kANonFinite),
                              py::arg("b_non_finite") = int(rm::kBNonFinite));
}

}  // namespace robustmerge_bindings
