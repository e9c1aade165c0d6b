"""The IR toolkit on ``onnx_ir``: graph analysis (linears, norm groups, residual stream), rewrite
helpers, graph building, model I/O, ORT sessions for IR models, and the integer-region checker."""
