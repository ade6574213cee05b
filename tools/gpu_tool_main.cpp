// The main of mixprec_gpu_selftest and mixprec_gpu_bench (tools/gpu_tools.cu): MIXPREC_GPU_TOOL
// names the tool's entry, set per program by tests/CMakeLists.txt.
int MIXPREC_GPU_TOOL(int argc, char** argv);
int main(int argc, char** argv) { return MIXPREC_GPU_TOOL(argc, argv); }
