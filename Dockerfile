# The project's images, built once (`docker compose build`, or `docker build --target server -t vlmserve .`);
# the compose file and the Kubernetes manifests (deploy/k8s) run them as they are.
#   server   NGC Triton + vLLM's CUDA wheel + the project: LLM hosts, ViT servers and the OpenAI proxy
#   builder  NGC TensorRT + the project's export tools: the vision tower's ONNX graph, its TensorRT plan and
#            the model repositories
# Both bases are the same NGC release, so a plan the builder writes loads in the server's TensorRT.
ARG NGC_RELEASE=24.10

FROM nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3 AS builder
WORKDIR /opt/vlmserve
COPY pyproject.toml README.md ./
COPY scripts/install-gpu.sh scripts/
COPY vlmserve vlmserve/
COPY export export/
COPY client client/
COPY openai_proxy openai_proxy/
COPY launcher launcher/
COPY model_repository model_repository/
RUN bash scripts/install-gpu.sh models
ENV PYTHONPATH=/opt/vlmserve

FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3 AS server
WORKDIR /opt/vlmserve
COPY --from=builder /opt/vlmserve /opt/vlmserve
RUN bash scripts/install-gpu.sh models,proxy,vllm-gpu
ENV PYTHONPATH=/opt/vlmserve
# Triton's HTTP, gRPC and metrics ports; the proxy listens on 9000 beside an LLM host's tritonserver.
EXPOSE 8000 8001 8002 9000
CMD ["tritonserver", "--help"]
