// The plan-table schema on the C++ side, declared once. Python's
// robustmerge_kernels/backends/tables.py is the schema's home (ITEM_COLUMNS, MODULE_COLUMNS,
// KERNEL/OUT dtype codes); the X-macros below list the same columns in the same order, and
// yield both the enums the kernels index with and the names the bindings export, which
// backends/base.py checks against tables.py when a compiled module is loaded. So a column
// added on one side and not the other fails loudly at import, never as a wrong read.
#pragma once

#include <cstdint>

namespace robustmerge {

// Item table: one row per (module, adapter), grouped by module in plan order.
#define RMK_ITEM_COLUMNS(X) \
  X(kItemA, "a")            \
  X(kItemB, "b")            \
  X(kItemADtype, "a_dtype") \
  X(kItemBDtype, "b_dtype") \
  X(kItemKA, "k_a")         \
  X(kItemKB, "k_b")

// Module table: one row per module; its items are [first, first + members).
#define RMK_MODULE_COLUMNS(X)       \
  X(kModRank, "rank")               \
  X(kModIn, "in_features")          \
  X(kModOut, "out_features")        \
  X(kModFirst, "first")             \
  X(kModMembers, "members")         \
  X(kModOutA, "out_a")              \
  X(kModOutB, "out_b")              \
  X(kModOutDtype, "out_dtype")      \
  X(kModClampIndex, "clamp_index")

#define RMK_ENUMERATOR(enumerator, name) enumerator,
#define RMK_COLUMN_NAME(enumerator, name) name,

enum ItemCol : int { RMK_ITEM_COLUMNS(RMK_ENUMERATOR) kItemCols };
enum ModuleCol : int { RMK_MODULE_COLUMNS(RMK_ENUMERATOR) kModCols };

inline constexpr const char* kItemColumnNames[] = {RMK_ITEM_COLUMNS(RMK_COLUMN_NAME)};
inline constexpr const char* kModuleColumnNames[] = {RMK_MODULE_COLUMNS(RMK_COLUMN_NAME)};

// Per-matrix status bits of the item status array.
enum Status : int32_t { kOk = 0, kANonFinite = 1, kBNonFinite = 2 };

}  // namespace robustmerge
