// Lets the OpenVINO 2021.4.2 Python binding export a MYRIAD blob without an NCS2 attached.
//
// IECore.load_network() compiles the network (with VPU_MYRIAD_PLATFORM set, the MYRIAD plugin compiles
// for the MA2480 offline, as OpenVINO's compile_tool does), then calls
// IEExecNetwork::createInferRequests(), which needs a device and throws "there is no available devices
// with platform 2480". This definition takes the place of that member (the binding calls it through
// the PLT, so a library loaded into the global symbol scope first wins): it creates no infer request,
// so ExecutableNetwork.export() can write the compiled blob. Used only by core/myriad_worker.py, which
// never runs inference on MYRIAD. Built by scripts/setup-myriad.sh.
namespace InferenceEnginePython {
struct IEExecNetwork {
    void createInferRequests(int num_requests);
};
void IEExecNetwork::createInferRequests(int) {}
}  // namespace InferenceEnginePython
