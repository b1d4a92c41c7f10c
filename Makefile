# Facial-landmark pipeline: train -> export -> INT8 -> benchmark -> gate.
# `make all` sets up a fresh machine and runs the main job on the shipped model and ../shared data.
PY      ?= .venv/bin/python
MODEL   ?= models/student_w05.pt
ART     ?= artifacts/student_w05
THREADS ?= 1,2

SHARED  ?= ../shared
GHOST   ?= artifacts/pfld_ghostone
TEACHER ?= $(SHARED)/teachers/pfld_ghostone/PFLD_GhostOne_112_1_opt_sim.onnx
LABELS  ?= runs/labels

.PHONY: all venv export quantize benchmark gate test test-fast train clean ghostone compare \
	labels train-student train-student-long train-student-wflw peers runtime-vs quantize-arm arm-check \
	train-heatmap heatmap-bundles detector photos train-student-wide train-student-neck

all: venv export quantize benchmark gate

venv: .venv/.installed
.venv/.installed: requirements.txt pyproject.toml
	python3 -m venv .venv
	# torch first and pinned: the local CPU wheel, not several GB of CUDA packages
	.venv/bin/pip install --quiet torch==2.13.0
	.venv/bin/pip install --quiet -r requirements.txt
	# the repository's packages, importable from anywhere (pyproject.toml); no build isolation:
	# the venv's own setuptools builds it (>= 70.1 builds wheels itself; torch brings one)
	.venv/bin/pip install --quiet "setuptools>=70.1"
	.venv/bin/pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

export: venv
	$(PY) export/run.py --checkpoint $(MODEL) --out $(ART)

quantize: export
	$(PY) quantize/run.py --bundle-dir $(ART)

benchmark: venv
	$(PY) benchmark/run.py --backend all --precision fp32,fp16,int8 --threads $(THREADS) \
		--bundles $(ART) --checkpoint $(MODEL) --out $(ART)/benchmark

gate: quantize
	$(PY) benchmark/run.py --backend all --threads 1 --runs 100 --no-plots \
		--bundles $(ART) --checkpoint $(MODEL) --out $(ART)/gate-run
	$(PY) benchmark/pairs.py --run $(ART)/gate-run
	$(PY) benchmark/gate.py --run $(ART)/gate-run

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# Reproduces the shipped model: 120 epochs with strong augmentation, 55 epochs of fine-tuning
# with milder augmentation, a 180-epoch second cosine cycle with milder augmentation still, then
# two runs fine-tuned from that cycle's held-out-best weights with an exponential moving average
# of the weights, whose final averages are weight-averaged ("greedy soup", chosen on the
# held-out training faces) and stripped of optimizer state. About 4 hours on 2 cores; each run
# resumes from its last.pt.
train: venv
	$(PY) train/run.py fit --dataset 300w --width 0.5 --epochs 120 --batch-size 32 \
		--out runs/w300_w05 --threads 2
	$(PY) train/run.py fit --dataset 300w --width 0.5 --epochs 55 --batch-size 32 --lr 5e-4 \
		--init runs/w300_w05/last.pt --aug-scale 1.1 1.45 --aug-rotate 20 --aug-occlude 0.15 \
		--eval-set 300w:helen_test --out runs/w300_w05_ft --threads 2
	$(PY) train/run.py fit --dataset 300w --width 0.5 --epochs 180 --batch-size 32 --lr 1e-3 \
		--init runs/w300_w05_ft/best.pt --aug-scale 1.15 1.35 --aug-rotate 15 --aug-occlude 0.05 \
		--eval-set 300w:helen_test --out runs/w300_w05_p3 --threads 2
	$(PY) train/run.py fit --dataset 300w --width 0.5 --epochs 150 --batch-size 32 --lr 5e-4 \
		--init runs/w300_w05_p3/best.pt --aug-scale 1.15 1.3 --aug-rotate 10 --aug-occlude 0 \
		--ema 0.998 --eval-set 300w:helen_test --out runs/w300_w05_p4a --threads 2
	$(PY) train/run.py fit --dataset 300w --width 0.5 --epochs 130 --batch-size 32 --lr 5e-4 \
		--init runs/w300_w05_p3/best.pt --aug-scale 1.15 1.35 --aug-rotate 15 --aug-occlude 0.05 \
		--ema 0.998 --seed 1 --eval-set 300w:helen_test --out runs/w300_w05_p4b --threads 2
	$(PY) train/soup.py runs/w300_w05_p4_soup.pt runs/w300_w05_p4a/last.pt runs/w300_w05_p4b/last.pt
	$(PY) train/ship.py runs/w300_w05_p4_soup.pt runs/pfld68_w05.pt

# An outside model as first-class bundles: PFLD-GhostOne (Apache-2.0, ../shared/teachers), imported
# with its spec, then INT8 on onnxruntime and OpenVINO through the escalation (onnxruntime's plain
# INT8 drifts +1.17 on this model; docs/quantization.md; TFLite needs onnx2tf, see docs/import.md)
ghostone: venv
	$(PY) export/run.py --import $(TEACHER) --spec specs/pfld_ghostone.json --out $(GHOST)
	$(PY) quantize/run.py --bundle-dir $(GHOST) --backend onnxruntime --backend openvino

# The shipped model, the imported teacher and the heatmap model (and any CANDIDATES bundle folders,
# e.g. CANDIDATES=artifacts/student_wflw_w05) in one table, one run, 1 thread,
# on every WFLW test face (505, both crop protocols) and HELEN, with the held-out training faces
# (selection only) beside them
CANDIDATES ?=
compare: quantize ghostone heatmap-bundles
	$(PY) benchmark/run.py --backend all --threads 1 --bundles $(ART) --bundles $(GHOST) \
		--bundles $(HM_ART) $(foreach c,$(CANDIDATES),--bundles $(c)) --checkpoint $(MODEL) --eval-set wflw:test/rect \
		--eval-set wflw:test/landmarks --eval-set 300w:helen_test/landmarks \
		--eval-set wflw:heldout/landmarks --eval-set 300w:heldout/landmarks --out artifacts/compare

# INT8 with the ARM preset (symmetric s8 activations) beside the x86 one, from the same FP32 bundles
quantize-arm: export
	rm -rf $(ART)-armpreset && mkdir -p $(ART)-armpreset
	cp -r $(ART)/onnx_sim_fp32 $(ART)/openvino_fp32 $(ART)/tflite_fp32 $(ART)-armpreset/
	$(PY) quantize/run.py --bundle-dir $(ART)-armpreset --preset arm

# Every bundle on emulated aarch64 (Raspberry Pi OS bookworm: Debian arm64 root, qemu-user,
# Cortex-A76 = Pi 5), compared with x86; the root is cached in ~/.cache/landmark-arm (docs/arm.md)
arm-check: quantize quantize-arm
	$(PY) benchmark/arm/check.py --install-tools --bundles $(ART) --bundles $(ART)-armpreset

# MediaPipe face mesh in its own venv, for the side-by-side runtime comparison only
peers: .venv-peers/.installed
.venv-peers/.installed: benchmark/peers/requirements.txt
	python3 -m venv .venv-peers
	.venv-peers/bin/pip install --quiet -r benchmark/peers/requirements.txt
	touch $@

# Our runtime and MediaPipe's face mesh, same inputs, same core, interleaved (docs/runtime.md)
runtime-vs: venv peers quantize
	$(PY) benchmark/runtime_vs.py --model $(ART)/onnx_int8 --out artifacts/runtime_vs_onnx_int8.json
	$(PY) benchmark/runtime_vs.py --model $(ART)/tflite_int8 --out artifacts/runtime_vs_tflite_int8.json

# Teacher labels (98 points, 3 passes, disagreement), cached by the teacher's sha256 and settings
labels: venv
	$(PY) train/run.py pseudo-label --teacher $(TEACHER) --teacher-spec specs/pfld_ghostone.json \
		--images 300w:train --out $(LABELS)/300w_train
	$(PY) train/run.py pseudo-label --teacher $(TEACHER) --teacher-spec specs/pfld_ghostone.json \
		--images $(SHARED)/wider_unlabeled --detector $(SHARED)/detectors/yunet/face_detection_yunet_2023mar.onnx \
		--out $(LABELS)/wider

# The two-head (68 + 98) student: one backbone, the 300-W labels on the 68 head, the teacher's
# labels on the 98 head (all faces) and, mapped by a linear 98 -> 68 map fitted on the 300-W
# training faces, on the 68 head for the pool faces; starts from the 68-point model
# (models/pfld68_w05.pt). One thread, resumable (about 70 s an epoch here); the epoch with the
# best held-out NME (300-W hash split + pool hash split) is stripped and written to runs/
# (ship it to models/ with `train/ship.py ... --replace-shipped`).
train-student: labels
	$(PY) train/run.py fit --dataset 300w --width 0.5 --heads 300w68,wflw98 \
		--labels $(LABELS)/300w_train --labels $(LABELS)/wider --init models/pfld68_w05.pt \
		--epochs 100 --batch-size 32 --lr 1e-3 --aug-scale 1.1 1.45 --aug-rotate 20 \
		--aug-occlude 0.15 --disagreement-tau 0.1 --ema 0.998 --threads 1 --out runs/student_w05
	$(PY) train/ship.py runs/student_w05/best.pt runs/student_w05.pt
	$(PY) train/run.py refit-head --checkpoint runs/student_w05.pt --head 300w68 \
		--out runs/student_w05.pt --report runs/student_w05_refit.json

# A candidate, not the shipped model (docs/student.md): train-student's recipe on a 200-epoch
# schedule, the epoch chosen with the held-out detector-box set too (--select-on-boxes); about
# 4 h on one thread, resumable (rerun the target). It writes runs/ only: nothing is shipped.
train-student-long: labels
	$(PY) train/run.py fit --dataset 300w --width 0.5 --heads 300w68,wflw98 \
		--labels $(LABELS)/300w_train --labels $(LABELS)/wider --init models/pfld68_w05.pt \
		--epochs 200 --batch-size 32 --lr 1e-3 --aug-scale 1.1 1.45 --aug-rotate 20 \
		--aug-occlude 0.15 --disagreement-tau 0.1 --ema 0.998 --threads 1 --select-on-boxes \
		--out runs/student_w05_e200

# The student with real WFLW labels (issue 22): train-student's data plus the WFLW train faces
# (98 real points, twice an epoch; their 68-point targets through the fitted 98 -> 68 map; a
# pool face that is one of them is dropped: the real label wins), a 4x neck (no INT8 latency
# cost: docs), fine-tuned from the shipped student; the epoch is chosen on the held-out 300-W,
# WFLW-train and pool faces. One thread, about 3 min an epoch here; resumable on any machine: a run
# that outlives a session keeps its last.pt/best.pt in resume/ (committed) and this target
# picks them up. Writes runs/ only.
WFLW_RUN ?= runs/student_wflw_w05
train-student-wflw: labels
	@if [ -f resume/student_wflw_w05/last.pt ] && [ ! -f $(WFLW_RUN)/last.pt ]; then \
		mkdir -p $(WFLW_RUN) && cp resume/student_wflw_w05/* $(WFLW_RUN)/; fi
	$(PY) train/run.py fit --dataset 300w --width 0.5 --neck 256 --heads 300w68,wflw98 \
		--labels $(LABELS)/300w_train --labels $(LABELS)/wider --real wflw:train --real-repeat 2 \
		--init models/student_w05.pt --epochs 16 --batch-size 32 --lr 2e-4 \
		--aug-scale 1.15 1.35 --aug-rotate 15 --aug-occlude 0.05 --disagreement-tau 0.1 \
		--ema 0.998 --threads 1 --out $(WFLW_RUN)

# The candidate that beats the shipped student on every held-out set (issue 22, docs/student.md):
# train-student-wflw's data and 4x neck with the shipped recipe's strong augmentation, lr 5e-4,
# the epoch chosen with the held-out detector-box set too, then the 68 head refitted. About
# 16 x 3.3 min on one thread here. Writes runs/ only; its result is kept in
# resume/student_neck256/candidate.pt until it is shipped.
NECK_RUN ?= runs/student_neck256
train-student-neck: labels
	$(PY) train/run.py fit --dataset 300w --width 0.5 --neck 256 --heads 300w68,wflw98 \
		--labels $(LABELS)/300w_train --labels $(LABELS)/wider --real wflw:train --real-repeat 2 \
		--init models/student_w05.pt --epochs 16 --batch-size 32 --lr 5e-4 \
		--aug-scale 1.1 1.45 --aug-rotate 20 --aug-occlude 0.15 --disagreement-tau 0.1 \
		--ema 0.998 --threads 1 --select-on-boxes --out $(NECK_RUN)
	$(PY) train/ship.py $(NECK_RUN)/best.pt $(NECK_RUN).pt
	$(PY) train/run.py refit-head --checkpoint $(NECK_RUN).pt --head 300w68 --select-on-boxes \
		--out $(NECK_RUN).pt --report $(NECK_RUN)_refit.json

# A wider student for issue 22 (capacity: docs/student.md): width 0.75, the 4x neck,
# train-student's data plus the real WFLW train labels, from scratch, 120 epochs, the epoch
# chosen with the held-out detector-box set too. Its INT8 bundles run at 1.3-1.6x GhostOne's
# OpenVINO INT8 (the ceiling), so it is the curve's accuracy point, not the ship candidate.
# One thread, about 5 min an epoch here: a multi-session run, resumable on any machine from
# resume/student_wide_w075 (committed at each stop while it runs). Writes runs/ only.
WIDE_RUN ?= runs/student_wide_w075
train-student-wide: labels
	@if [ -f resume/student_wide_w075/last.pt ] && [ ! -f $(WIDE_RUN)/last.pt ]; then \
		mkdir -p $(WIDE_RUN) && cp resume/student_wide_w075/* $(WIDE_RUN)/; fi
	$(PY) train/run.py fit --dataset 300w --width 0.75 --neck 256 --heads 300w68,wflw98 \
		--labels $(LABELS)/300w_train --labels $(LABELS)/wider --real wflw:train --real-repeat 2 \
		--epochs 120 --batch-size 32 --lr 1e-3 --aug-scale 1.1 1.45 --aug-rotate 20 \
		--aug-occlude 0.15 --disagreement-tau 0.1 --ema 0.998 --threads 1 --select-on-boxes \
		--out $(WIDE_RUN)

# The heatmap family's ablation at our scale (docs/heatmaps.md): same backbone, width,
# data (the 300-W labels) and budget; rounded vs continuous targets, + Siamese, and a
# direct-regression PFLD as the baseline; then every run x every decoder in one table (the
# decoder window is chosen on the held-out faces) and the continuous run shipped with it
HM_EPOCHS ?= 60
train-heatmap: venv
	$(PY) train/run.py fit --family heatmap --hm-encoding rounded --hm-decoder argmax_quarter \
		--width 0.5 --epochs $(HM_EPOCHS) --batch-size 32 --lr 2e-3 --aug-scale 1.1 1.45 \
		--aug-rotate 20 --threads 1 --out runs/hm_round
	$(PY) train/run.py fit --family heatmap --hm-encoding continuous --width 0.5 \
		--epochs $(HM_EPOCHS) --batch-size 32 --lr 2e-3 --aug-scale 1.1 1.45 --aug-rotate 20 \
		--threads 1 --out runs/hm_cont
	$(PY) train/run.py fit --family heatmap --hm-encoding continuous --siamese --width 0.5 \
		--epochs $(HM_EPOCHS) --batch-size 32 --lr 2e-3 --aug-scale 1.1 1.45 --aug-rotate 20 \
		--threads 1 --out runs/hm_siamese
	$(PY) train/run.py fit --dataset 300w --width 0.5 --epochs $(HM_EPOCHS) --batch-size 32 \
		--lr 2e-3 --aug-scale 1.1 1.45 --aug-rotate 20 --threads 1 --out runs/reg_60
	$(PY) train/run.py hm-ablation runs/hm_round runs/hm_cont runs/hm_siamese runs/reg_60 \
		--out artifacts/heatmap/ablation.json
	$(PY) train/ship.py runs/hm_siamese/best.pt runs/heatmap_w05.pt --arch-set window=7

# The committed heatmap model (the Siamese run of train-heatmap, decoder window 7 as chosen on
# the held-out faces) as FP32 bundles, then INT8 on every backend under the usual budget (judged
# on the held-out WFLW train faces; docs/heatmaps.md). No FP16 targets: their parity check fails
# on this model (a point of a two-peaked map jumps to the other peak).
heatmap-bundles: venv
	$(PY) export/run.py --checkpoint $(HM) --out $(HM_ART) \
		--targets onnx_fp32,onnx_sim_fp32,openvino_fp32,tflite_fp32
	$(PY) quantize/run.py --bundle-dir $(HM_ART)

# The face detector as bundles: YuNet -> ONNX (any input size) -> simplified ONNX -> OpenVINO IR
# (FP32, FP16), parity-checked against cv2.FaceDetectorYN, then INT8 (onnxruntime, OpenVINO)
# under a recall budget on the choosing part of ../shared/photos (docs/runtime.md)
DET_ART ?= artifacts/yunet
detector: venv
	$(PY) export/detector.py --out $(DET_ART)
	$(PY) quantize/detector.py --bundle-dir $(DET_ART)

# Detection recall and time per photo on whole photos: every detector bundle at every size on
# the choosing part (and the default size's rule), then the reporting part with the pipeline
photos: detector
	$(PY) benchmark/photos.py choose --bundles $(DET_ART)
	$(PY) benchmark/photos.py report --bundles $(DET_ART) --model $(ART)/onnx_int8

clean:
	rm -rf artifacts
