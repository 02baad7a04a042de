"""Row movement and grouped matrix products: plain torch on CPU, the GPU paths beside them."""
from .grouped import grouped_mm, grouped_mm_wgrad
from .permute import gather_rows, gather_rows_into, gather_slots, reduce_rows

__all__ = ["grouped_mm", "grouped_mm_wgrad", "gather_rows", "gather_rows_into", "gather_slots", "reduce_rows"]
