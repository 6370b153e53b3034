"""The step profile: its reading of compiled programs and a real profile of a tiny step on CPU."""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'bench'))
import step_profile  # noqa: E402

# A compiled module as XLA prints it: a BatchNorm statistic (per channel over N, H, W), a loss
# sum, a convolution fused with its epilogue, a cuDNN call, max pooling, XLA's windowed
# reduction of a flag, a dot and an all-reduce; then as XLA's GPU compiler prints them, a partial
# BatchNorm gradient sum (rank 3, named by the layer's scope), the scatter it makes of max
# pooling's gradient and an elementwise fusion.
_HLO = '''HloModule jit_step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_statistics (param_0: f32[8,4,4,16]) -> f32[16] {
  %param_0 = f32[8,4,4,16]{3,2,1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %reduce.1 = f32[16]{0} reduce(%param_0, %zero), dimensions={0,1,2}, to_apply=%add
}

%fused_loss (param_0.1: f32[8,5]) -> f32[] {
  %param_0.1 = f32[8,5]{1,0} parameter(0)
  %zero.1 = f32[] constant(0)
  ROOT %reduce.2 = f32[] reduce(%param_0.1, %zero.1), dimensions={0,1}, to_apply=%add
}

%fused_partial_statistics (param_0.5: bf16[4096,16]) -> bf16[512,16] {
  %param_0.5 = bf16[4096,16]{1,0} parameter(0)
  %reshape.5 = bf16[512,8,16]{2,1,0} reshape(%param_0.5), metadata={op_name="jit(per_device)/transpose(jvp(batch_norm))/reduce_sum"}
  %zero.5 = bf16[] constant(0)
  ROOT %reduce.5 = bf16[512,16]{1,0} reduce(%reshape.5, %zero.5), dimensions={1}, to_apply=%add, metadata={op_name="jit(per_device)/transpose(jvp(batch_norm))/reduce_sum"}
}

%fused_pool_gradient (param_0.6: bf16[8,6,6,16], param_1.6: s32[64,4], param_2.6: bf16[64]) -> bf16[8,6,6,16] {
  %param_0.6 = bf16[8,6,6,16]{3,2,1,0} parameter(0)
  %param_1.6 = s32[64,4]{1,0} parameter(1)
  %param_2.6 = bf16[64]{0} parameter(2)
  ROOT %scatter.6 = bf16[8,6,6,16]{3,2,1,0} scatter(%param_0.6, %param_1.6, %param_2.6), update_window_dims={}, inserted_window_dims={0,1,2,3}, scatter_dims_to_operand_dims={0,1,2,3}, index_vector_dim=1, to_apply=%add, metadata={op_name="jit(per_device)/transpose(jvp())/select_and_scatter"}
}

%fused_relu_gradient (param_0.7: bf16[8,4,4,16]) -> bf16[8,4,4,16] {
  %param_0.7 = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  ROOT %maximum.7 = bf16[8,4,4,16]{3,2,1,0} maximum(%param_0.7, %param_0.7), metadata={op_name="jit(per_device)/transpose(jvp())/max"}
}

%fused_conv (param_0.2: f32[8,4,4,3], param_1.2: f32[3,3,3,16]) -> f32[8,4,4,16] {
  %param_0.2 = f32[8,4,4,3]{3,2,1,0} parameter(0)
  %param_1.2 = f32[3,3,3,16]{3,2,1,0} parameter(1)
  %convolution.3 = f32[8,4,4,16]{3,2,1,0} convolution(%param_0.2, %param_1.2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  ROOT %maximum.4 = f32[8,4,4,16]{3,2,1,0} maximum(%convolution.3, %convolution.3)
}

ENTRY %main.9 (x: f32[8,4,4,3], w: f32[3,3,3,16], y: f32[8,5], m: f32[5,7], f: pred[64]) -> f32[] {
  %x = f32[8,4,4,3]{3,2,1,0} parameter(0)
  %w = f32[3,3,3,16]{3,2,1,0} parameter(1)
  %y = f32[8,5]{1,0} parameter(2)
  %m = f32[5,7]{1,0} parameter(3)
  %f = pred[64]{0} parameter(4)
  %fusion.1 = f32[8,4,4,16]{3,2,1,0} fusion(%x, %w), kind=kOutput, calls=%fused_conv
  %custom-call.2 = (f32[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward"
  %fusion.3 = f32[16]{0} fusion(%fusion.1), kind=kInput, calls=%fused_statistics
  %fusion.4 = f32[] fusion(%y), kind=kInput, calls=%fused_loss
  %zero.2 = f32[] constant(0)
  %reduce-window.5 = f32[8,2,2,16]{3,2,1,0} reduce-window(%fusion.1, %zero.2), window={size=1x3x3x1 stride=1x2x2x1}, to_apply=%add
  %false = pred[] constant(false)
  %reduce-window.6 = pred[2]{0} reduce-window(%f, %false), window={size=32 stride=32}, to_apply=%add
  %dot.7 = f32[8,7]{1,0} dot(%y, %m), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %all-reduce.8 = f32[] all-reduce(%fusion.4), replica_groups={}, to_apply=%add
  %p.10 = bf16[4096,16]{1,0} parameter(5)
  %input_reduce_fusion.10 = bf16[512,16]{1,0} fusion(%p.10), kind=kInput, calls=%fused_partial_statistics
  %p.11 = bf16[8,6,6,16]{3,2,1,0} parameter(6)
  %p.12 = s32[64,4]{1,0} parameter(7)
  %p.13 = bf16[64]{0} parameter(8)
  %input_scatter_fusion.11 = bf16[8,6,6,16]{3,2,1,0} fusion(%p.11, %p.12, %p.13), kind=kInput, calls=%fused_pool_gradient
  %p.14 = bf16[8,4,4,16]{3,2,1,0} parameter(9)
  %loop_maximum_fusion.12 = bf16[8,4,4,16]{3,2,1,0} fusion(%p.14), kind=kLoop, calls=%fused_relu_gradient
  ROOT %add.9 = f32[] add(%all-reduce.8, %all-reduce.8)
}
'''


def test_operations_are_sorted_into_their_kinds():
  instructions, computations = step_profile.parse_hlo(_HLO)
  kinds = {name: step_profile.kind_of(name, instructions, computations)
           for name in ('fusion.1', 'custom-call.2', 'fusion.3', 'fusion.4', 'reduce-window.5',
                        'reduce-window.6', 'dot.7', 'all-reduce.8', 'add.9',
                        'input_reduce_fusion.10', 'input_scatter_fusion.11',
                        'loop_maximum_fusion.12')}
  assert kinds == {'fusion.1': 'convolution', 'custom-call.2': 'convolution',
                   'fusion.3': 'normalisation', 'fusion.4': 'reduction',
                   'reduce-window.5': 'pooling', 'reduce-window.6': 'reduction',
                   'dot.7': 'matmul', 'all-reduce.8': 'collective', 'add.9': 'elementwise',
                   'input_reduce_fusion.10': 'normalisation', 'input_scatter_fusion.11': 'pooling',
                   'loop_maximum_fusion.12': 'elementwise'}


def test_top_operations_are_described_from_the_program():
  what = step_profile.describe(_HLO, ['input_scatter_fusion_11', 'custom-call.2', 'missing'])
  assert what == {'input_scatter_fusion_11': ('bf16[8,6,6,16]', ''),
                  'custom-call.2': ('(f32[8,4,4,16], u8[0])', '')}
  line = '  %fusion.3 = f32[16]{0} fusion(%a), calls=%f, metadata={op_name="jit(step)/jvp()/add"}'
  assert step_profile.describe(line, ['fusion.3']) == {'fusion.3': ('f32[16]', 'jvp()/add')}


def test_bytes_are_estimated_from_the_program():
  moved = step_profile.traffic(_HLO)
  # The BatchNorm statistic reads f32[8,4,4,16] (8,192 bytes) and writes f32[16] (64).
  assert moved['fusion.3'] == 8192 + 64
  # cuDNN's call: its result, not its u8 workspace, and its two operands.
  assert moved['custom-call.2'] == 8192 + 8 * 4 * 4 * 3 * 4 + 3 * 3 * 3 * 16 * 4
  # An operand used twice is read once: max(x, x) of bf16[8,4,4,16] reads and writes 4,096.
  assert moved['loop_maximum_fusion.12'] == 2 * 4096
  # Parameters, constants and the fusions' bodies are not operations of their own.
  assert not {'x', 'zero.2', 'reduce.1', 'maximum.4'} & set(moved)


# A step with a guard: a conditional whose branches move different amounts.
_GUARDED = '''HloModule jit_step

%fused_update (p: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0} parameter(0)
  ROOT %n = f32[1024]{0} negate(%p)
}

%update (t: (f32[1024])) -> (f32[1024]) {
  %t = (f32[1024]{0}) parameter(0)
  %g = f32[1024]{0} get-tuple-element(%t), index=0
  %loop_negate_fusion = f32[1024]{0} fusion(%g), kind=kLoop, calls=%fused_update
  ROOT %r = (f32[1024]{0}) tuple(%loop_negate_fusion)
}

%keep (t.1: (f32[1024])) -> (f32[1024]) {
  %t.1 = (f32[1024]{0}) parameter(0)
  %g.1 = f32[] get-tuple-element(%t.1), index=0
  %copy.1 = f32[] copy(%g.1)
  ROOT %r.1 = (f32[]) tuple(%copy.1)
}

ENTRY %main (flag: pred[], x: f32[1024]) -> (f32[1024]) {
  %flag = pred[] parameter(0)
  %x = f32[1024]{0} parameter(1)
  %copy.2 = f32[1024]{0} copy(%x)
  %tuple = (f32[1024]{0}) tuple(%copy.2)
  ROOT %conditional = (f32[1024]{0}) conditional(%flag, %tuple, %tuple), true_computation=%update, false_computation=%keep
}
'''


def test_one_step_counts_the_costlier_branch_of_a_conditional():
  assert step_profile.one_step_traffic(_GUARDED) == {'copy.2': 8192, 'loop_negate_fusion': 8192}
  table = step_profile.program_table(_GUARDED, 'NVIDIA H200')
  assert '| elementwise | 2 | 0.00 |' in table and "at NVIDIA H200's 4.8 TB/s" in table
  assert step_profile.peak_tbps('NVIDIA H100 PCIe') == 2.0
  assert step_profile.peak_tbps('NVIDIA H100 80GB HBM3') == 3.35


def test_a_tiny_step_is_profiled_on_cpu(tmp_path):
  args = argparse.Namespace(backbone='resnet18_ibn_a', width=8, last_stride=1, num_classes=20,
                            k=4, attention='xla', size='32x32', batch=16, dtype='float32',
                            warmup=1, steps=2, trace_dir=str(tmp_path / 'trace'), hlo=None)
  result = step_profile.profile(args)
  per_kind = result['per_kind']
  # Every operation the CPU runtime ran was found in the compiled program.
  assert per_kind['unmatched'] == [0.0, 0.0]
  busy = sum(micros for micros, _ in per_kind.values())
  # Time was found for them (their share varies with the machine's load: not checked here).
  assert busy > 0 and per_kind['convolution'][0] > 0
  # ResNet18-IBN-a: 20 convolutions forward, each with its gradients; its BatchNorms and
  # InstanceNorms reduce per channel forward and backward.
  assert per_kind['convolution'][1] >= 20 and per_kind['normalisation'][1] >= 20
  table = step_profile.table(result, args)
  assert '| convolution |' in table and '| normalisation |' in table
  # The costliest operations carry their shapes from the compiled program, and the time is
  # also summed by source operation (convolutions among them).
  assert all(what for _, _, _, what in result['top'])
  assert any('conv_general_dilated' in source for _, _, source in result['sources'])
  assert '| source operation (op_name) |' in table
  # Bytes moved per kind, estimated from the program, for the operations the trace saw.
  assert result['bytes_per_kind']['convolution'] > 0 and '| GB per step (estimate) |' in table


# XLA's GPU command buffers are calls; an asynchronous all-reduce is a start and a done.
_CALLED = '''HloModule jit_step

%add.1 (a.1: f32[], b.1: f32[]) -> f32[] {
  %a.1 = f32[] parameter(0)
  %b.1 = f32[] parameter(1)
  ROOT %s.1 = f32[] add(%a.1, %b.1)
}

%fused_negate (p.1: f32[256]) -> f32[256] {
  %p.1 = f32[256]{0} parameter(0)
  ROOT %n.1 = f32[256]{0} negate(%p.1)
}

%command_buffer (q: f32[256]) -> f32[256] {
  %q = f32[256]{0} parameter(0)
  ROOT %loop_negate_fusion.1 = f32[256]{0} fusion(%q), kind=kLoop, calls=%fused_negate
}

ENTRY %main.2 (x.1: f32[256]) -> f32[256] {
  %x.1 = f32[256]{0} parameter(0)
  %call.1 = f32[256]{0} call(%x.1), to_apply=%command_buffer
  %all-reduce-start.1 = f32[256]{0} all-reduce-start(%call.1), replica_groups={}, to_apply=%add.1
  ROOT %all-reduce-done.1 = f32[256]{0} all-reduce-done(%all-reduce-start.1)
}
'''


def test_a_calls_body_is_counted_and_an_async_op_once():
  assert step_profile.one_step_traffic(_CALLED) == {'loop_negate_fusion.1': 2048,
                                                    'all-reduce-start.1': 2048}
