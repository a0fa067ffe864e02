//! A small SPIR-V reflector for compute shaders, with no dependency beyond `thiserror`.
//!
//! vkdecode loads third-party compute shaders (llama.cpp's `flash_attn.comp` compiled by glslc,
//! for example) from a declarative manifest. [`reflect`] reads what the module itself declares so
//! that the manifest can be checked against it: the entry points and the compute workgroup size,
//! the descriptor bindings, the size of the push-constant block, the specialization constants,
//! and the capabilities and extensions (which say what device features the shader needs).
//!
//! Only the module's global section matters here (debug names, annotations, types, constants and
//! global variables); function bodies are walked for well-formed instruction framing only. The
//! reader never panics on malformed input: every index is guarded, every size is computed with
//! checked arithmetic, type nesting is depth-limited, and each [`ReflectError`] names the word
//! offset (counted in 32-bit words from the start of the module, the 5-word header included)
//! where the problem is.
//!
//! Numbers come from the SPIR-V specification (spirv.core.grammar.json, unified1).

use std::collections::{BTreeMap, HashMap, HashSet};

/// The SPIR-V magic number, as the first word of a module.
const MAGIC: u32 = 0x0723_0203;
/// Header words: magic, version, generator, id bound, schema.
const HEADER_WORDS: usize = 5;
/// Deepest type nesting followed (arrays of structs of arrays ...); deeper is an error.
const MAX_TYPE_DEPTH: u32 = 64;

/// `ExecutionModel::GLCompute`.
pub const EXECUTION_MODEL_GLCOMPUTE: u32 = 5;

/// Opcodes used by the reader.
mod op {
    pub const NAME: u32 = 5;
    pub const EXTENSION: u32 = 10;
    pub const ENTRY_POINT: u32 = 15;
    pub const EXECUTION_MODE: u32 = 16;
    pub const CAPABILITY: u32 = 17;
    pub const TYPE_VOID: u32 = 19;
    pub const TYPE_BOOL: u32 = 20;
    pub const TYPE_INT: u32 = 21;
    pub const TYPE_FLOAT: u32 = 22;
    pub const TYPE_VECTOR: u32 = 23;
    pub const TYPE_MATRIX: u32 = 24;
    pub const TYPE_IMAGE: u32 = 25;
    pub const TYPE_SAMPLER: u32 = 26;
    pub const TYPE_SAMPLED_IMAGE: u32 = 27;
    pub const TYPE_ARRAY: u32 = 28;
    pub const TYPE_RUNTIME_ARRAY: u32 = 29;
    pub const TYPE_STRUCT: u32 = 30;
    pub const TYPE_OPAQUE: u32 = 31;
    pub const TYPE_POINTER: u32 = 32;
    pub const TYPE_FUNCTION: u32 = 33;
    pub const CONSTANT_TRUE: u32 = 41;
    pub const CONSTANT_FALSE: u32 = 42;
    pub const CONSTANT: u32 = 43;
    pub const CONSTANT_COMPOSITE: u32 = 44;
    pub const CONSTANT_NULL: u32 = 46;
    pub const SPEC_CONSTANT_TRUE: u32 = 48;
    pub const SPEC_CONSTANT_FALSE: u32 = 49;
    pub const SPEC_CONSTANT: u32 = 50;
    pub const SPEC_CONSTANT_COMPOSITE: u32 = 51;
    pub const SPEC_CONSTANT_OP: u32 = 52;
    pub const VARIABLE: u32 = 59;
    pub const DECORATE: u32 = 71;
    pub const MEMBER_DECORATE: u32 = 72;
    pub const GROUP_DECORATE: u32 = 74;
    pub const GROUP_MEMBER_DECORATE: u32 = 75;
    pub const EXECUTION_MODE_ID: u32 = 331;
    pub const DECORATE_ID: u32 = 332;
    pub const TYPE_RAY_QUERY_KHR: u32 = 4472;
    pub const TYPE_COOPERATIVE_MATRIX_KHR: u32 = 4456;
    pub const TYPE_ACCELERATION_STRUCTURE_KHR: u32 = 5341;
    pub const DECORATE_STRING: u32 = 5632;
    pub const MEMBER_DECORATE_STRING: u32 = 5633;
}

/// Decorations used by the reader.
mod deco {
    pub const SPEC_ID: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const BUFFER_BLOCK: u32 = 3;
    pub const ROW_MAJOR: u32 = 4;
    pub const ARRAY_STRIDE: u32 = 6;
    pub const MATRIX_STRIDE: u32 = 7;
    pub const BUILT_IN: u32 = 11;
    pub const NON_WRITABLE: u32 = 24;
    pub const NON_READABLE: u32 = 25;
    pub const BINDING: u32 = 33;
    pub const DESCRIPTOR_SET: u32 = 34;
    pub const OFFSET: u32 = 35;
}

/// Storage classes used by the reader.
mod sc {
    pub const UNIFORM: u32 = 2;
    pub const FUNCTION: u32 = 7;
    pub const PUSH_CONSTANT: u32 = 9;
    pub const STORAGE_BUFFER: u32 = 12;
    pub const PHYSICAL_STORAGE_BUFFER: u32 = 5349;
}

/// `ExecutionMode::LocalSize` (literal x, y, z).
const MODE_LOCAL_SIZE: u32 = 17;
/// `ExecutionMode::LocalSizeId` (constant ids x, y, z; via OpExecutionModeId).
const MODE_LOCAL_SIZE_ID: u32 = 38;
/// `BuiltIn::WorkgroupSize`.
const BUILTIN_WORKGROUP_SIZE: u32 = 25;

/// What a SPIR-V module declares that matters for running it as a compute shader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reflection {
    /// Every OpEntryPoint, in module order.
    pub entry_points: Vec<EntryPoint>,
    /// The workgroup size of the (first) GLCompute entry point.
    pub local_size: LocalSize,
    /// Descriptor bindings, sorted by (set, binding); aliased variables (several variables on one
    /// binding, as llama.cpp declares `Q` and `QV4`) are merged into one entry.
    pub bindings: Vec<Binding>,
    /// Size in bytes of the push-constant block, None if the shader has none.
    pub push_constant_bytes: Option<u32>,
    /// Specialization constants (OpSpecConstant{,True,False} decorated SpecId), sorted by id, one
    /// per id.
    pub spec_constants: Vec<SpecConstant>,
    /// OpCapability operands, in module order.
    pub capabilities: Vec<u32>,
    /// OpExtension strings, in module order.
    pub extensions: Vec<String>,
}

impl Reflection {
    /// The GLCompute entry point (the first one, if there are several).
    pub fn entry(&self) -> Option<&EntryPoint> {
        self.entry_points.iter().find(|e| e.execution_model == EXECUTION_MODEL_GLCOMPUTE)
    }

    /// The binding at (set, binding), if the shader declares one.
    pub fn binding(&self, set: u32, binding: u32) -> Option<&Binding> {
        self.bindings.binary_search_by_key(&(set, binding), |b| (b.set, b.binding)).ok().map(|i| &self.bindings[i])
    }
}

/// One OpEntryPoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub name: String,
    /// SPIR-V `ExecutionModel`; GLCompute is [`EXECUTION_MODEL_GLCOMPUTE`] (5).
    pub execution_model: u32,
}

/// A compute workgroup size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSize {
    pub x: Dim,
    pub y: Dim,
    pub z: Dim,
}

/// One dimension of a workgroup size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Literal(u32),
    /// Set by the specialization constant `id` (GLSL `local_size_x_id = id`), `default` if unset.
    Spec { id: u32, default: u32 },
}

impl Dim {
    /// The size when no specialization is given.
    pub fn default_value(&self) -> u32 {
        match *self {
            Dim::Literal(v) => v,
            Dim::Spec { default, .. } => default,
        }
    }
}

/// One descriptor binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub set: u32,
    pub binding: u32,
    pub kind: BindingKind,
    /// OpName of the variable, else of its block struct type, else None (empty names count as
    /// none). For aliased variables, the first one's name that exists.
    pub name: Option<String>,
    /// The variable is decorated NonWritable, or every member of its block struct is (GLSL
    /// `readonly`). For aliased variables: all of them are.
    pub non_writable: bool,
    /// The same for NonReadable (GLSL `writeonly`).
    pub non_readable: bool,
}

/// What kind of descriptor a binding needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingKind {
    /// Storage class StorageBuffer, or Uniform with a BufferBlock struct (old style).
    StorageBuffer,
    /// Storage class Uniform with a Block struct.
    UniformBuffer,
    /// Anything else (images, samplers, ...): the variable's storage class.
    Other(u32),
}

/// One specialization constant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecConstant {
    /// The SpecId (GLSL `constant_id`).
    pub id: u32,
    /// OpName of the constant, None if absent or empty.
    pub name: Option<String>,
    pub kind: SpecKind,
}

/// Type and default value of a specialization constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecKind {
    Bool {
        default: bool,
    },
    /// `default` holds the value's low `width` bits (two's complement for signed types), as they
    /// go into `VkSpecializationInfo` data.
    Int {
        width: u32,
        signed: bool,
        default: u64,
    },
    /// `default_bits` holds the IEEE (or other encoding's) bit pattern in its low `width` bits.
    Float {
        width: u32,
        default_bits: u64,
    },
}

impl SpecKind {
    /// Same variant and width (the signedness of integers may differ).
    fn same_shape(&self, other: &SpecKind) -> bool {
        match (self, other) {
            (SpecKind::Bool { .. }, SpecKind::Bool { .. }) => true,
            (SpecKind::Int { width: a, .. }, SpecKind::Int { width: b, .. }) => a == b,
            (SpecKind::Float { width: a, .. }, SpecKind::Float { width: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// Why a module could not be reflected. Word offsets count 32-bit words from the start of the
/// module (the header is words 0..5).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReflectError {
    #[error("not SPIR-V: input is {len} bytes, shorter than the 20-byte module header")]
    TooShort { len: usize },
    #[error("not SPIR-V: input length {len} bytes is not a whole number of 32-bit words")]
    NotWordAligned { len: usize },
    #[error("not SPIR-V: magic number {magic:#010x} at word 0 (expected 0x07230203 in either byte order)")]
    BadMagic { magic: u32 },
    #[error("instruction at word {word} has word count 0")]
    ZeroWordCount { word: usize },
    #[error(
        "truncated instruction at word {word}: opcode {opcode} claims {word_count} words but only {remaining} remain"
    )]
    TruncatedInstruction { word: usize, opcode: u32, word_count: usize, remaining: usize },
    #[error("instruction at word {word} (opcode {opcode}) has {word_count} words, too few for its operands")]
    MissingOperand { word: usize, opcode: u32, word_count: usize },
    #[error("id %{id} at word {word} is past the id bound {bound}")]
    IdOutOfBounds { id: u32, word: usize, bound: u32 },
    #[error("id 0 at word {word} is not a valid id")]
    ZeroId { word: usize },
    #[error("id %{id} is defined a second time at word {word}")]
    DuplicateId { id: u32, word: usize },
    #[error("string at word {word} {problem}")]
    BadString { word: usize, problem: &'static str },
    #[error("id %{id} (used at word {word}) is not {expected}")]
    WrongKind { id: u32, word: usize, expected: &'static str },
    #[error("decoration {decoration} at word {word} is missing its operand")]
    DecorationMissingOperand { decoration: u32, word: usize },
    #[error("no GLCompute entry point (entry points: {found})")]
    NoComputeEntryPoint { found: String },
    #[error("GLCompute entry point `{name}` (word {word}) has no LocalSize, LocalSizeId or WorkgroupSize")]
    NoLocalSize { name: String, word: usize },
    #[error("workgroup size at word {word}: {problem}")]
    BadWorkgroupSize { word: usize, problem: String },
    #[error("type %{id} at word {word} is nested more than {limit} levels deep (or refers to itself)")]
    TypeTooDeep { id: u32, word: usize, limit: u32 },
    #[error("variable at word {word} does not point to a struct{context}")]
    NotAStruct { word: usize, context: &'static str },
    #[error("push-constant member {member} has no Offset decoration (struct %{id} at word {word})")]
    MissingOffset { member: u32, id: u32, word: usize },
    #[error("push-constant member {member} has an array of spec-constant length (array type at word {word})")]
    SpecConstantArrayLength { member: u32, word: usize },
    #[error("push-constant member {member} contains a runtime array (type at word {word}), which has no size")]
    RuntimeArray { member: u32, word: usize },
    #[error("push-constant member {member} has a type with no defined size ({what}, at word {word})")]
    UnsizedType { member: u32, word: usize, what: &'static str },
    #[error("push-constant member {member}: size overflows 32 bits (type at word {word})")]
    SizeOverflow { member: u32, word: usize },
    #[error("variable at word {word} has a DescriptorSet decoration but no Binding")]
    MissingBinding { word: usize },
    #[error("set {set} binding {binding} is declared as {first:?} and, by the variable at word {word}, as {second:?}")]
    ConflictingBinding { set: u32, binding: u32, first: BindingKind, second: BindingKind, word: usize },
    #[error("spec constant at word {word} (SpecId {spec_id}): {problem}")]
    BadSpecConstant { spec_id: u32, word: usize, problem: String },
    #[error("SpecId {spec_id} is used by constants of different types ({first:?} and, at word {word}, {second:?})")]
    ConflictingSpecId { spec_id: u32, first: SpecKind, second: SpecKind, word: usize },
}

type Result<T> = std::result::Result<T, ReflectError>;

/// The name of a SPIR-V `Capability` (as in the specification), None if this table lacks it.
pub fn capability_name(cap: u32) -> Option<&'static str> {
    Some(match cap {
        0 => "Matrix",
        1 => "Shader",
        2 => "Geometry",
        3 => "Tessellation",
        4 => "Addresses",
        5 => "Linkage",
        6 => "Kernel",
        7 => "Vector16",
        8 => "Float16Buffer",
        9 => "Float16",
        10 => "Float64",
        11 => "Int64",
        12 => "Int64Atomics",
        13 => "ImageBasic",
        14 => "ImageReadWrite",
        15 => "ImageMipmap",
        17 => "Pipes",
        18 => "Groups",
        19 => "DeviceEnqueue",
        20 => "LiteralSampler",
        21 => "AtomicStorage",
        22 => "Int16",
        23 => "TessellationPointSize",
        24 => "GeometryPointSize",
        25 => "ImageGatherExtended",
        27 => "StorageImageMultisample",
        28 => "UniformBufferArrayDynamicIndexing",
        29 => "SampledImageArrayDynamicIndexing",
        30 => "StorageBufferArrayDynamicIndexing",
        31 => "StorageImageArrayDynamicIndexing",
        32 => "ClipDistance",
        33 => "CullDistance",
        34 => "ImageCubeArray",
        35 => "SampleRateShading",
        36 => "ImageRect",
        37 => "SampledRect",
        38 => "GenericPointer",
        39 => "Int8",
        40 => "InputAttachment",
        41 => "SparseResidency",
        42 => "MinLod",
        43 => "Sampled1D",
        44 => "Image1D",
        45 => "SampledCubeArray",
        46 => "SampledBuffer",
        47 => "ImageBuffer",
        48 => "ImageMSArray",
        49 => "StorageImageExtendedFormats",
        50 => "ImageQuery",
        51 => "DerivativeControl",
        52 => "InterpolationFunction",
        53 => "TransformFeedback",
        54 => "GeometryStreams",
        55 => "StorageImageReadWithoutFormat",
        56 => "StorageImageWriteWithoutFormat",
        57 => "MultiViewport",
        58 => "SubgroupDispatch",
        59 => "NamedBarrier",
        60 => "PipeStorage",
        61 => "GroupNonUniform",
        62 => "GroupNonUniformVote",
        63 => "GroupNonUniformArithmetic",
        64 => "GroupNonUniformBallot",
        65 => "GroupNonUniformShuffle",
        66 => "GroupNonUniformShuffleRelative",
        67 => "GroupNonUniformClustered",
        68 => "GroupNonUniformQuad",
        69 => "ShaderLayer",
        70 => "ShaderViewportIndex",
        71 => "UniformDecoration",
        4165 => "CoreBuiltinsARM",
        4212 => "Float8EXT",
        4213 => "Float8CooperativeMatrixEXT",
        4423 => "SubgroupBallotKHR",
        4427 => "DrawParameters",
        4428 => "WorkgroupMemoryExplicitLayoutKHR",
        4429 => "WorkgroupMemoryExplicitLayout8BitAccessKHR",
        4430 => "WorkgroupMemoryExplicitLayout16BitAccessKHR",
        4431 => "SubgroupVoteKHR",
        4433 => "StorageBuffer16BitAccess",
        4434 => "UniformAndStorageBuffer16BitAccess",
        4435 => "StoragePushConstant16",
        4436 => "StorageInputOutput16",
        4437 => "DeviceGroup",
        4439 => "MultiView",
        4441 => "VariablePointersStorageBuffer",
        4442 => "VariablePointers",
        4445 => "AtomicStorageOps",
        4448 => "StorageBuffer8BitAccess",
        4449 => "UniformAndStorageBuffer8BitAccess",
        4450 => "StoragePushConstant8",
        4464 => "DenormPreserve",
        4465 => "DenormFlushToZero",
        4466 => "SignedZeroInfNanPreserve",
        4467 => "RoundingModeRTE",
        4468 => "RoundingModeRTZ",
        4472 => "RayQueryKHR",
        4473 => "UntypedPointersKHR",
        4479 => "RayTracingKHR",
        5008 => "Float16ImageAMD",
        5009 => "ImageGatherBiasLodAMD",
        5010 => "FragmentMaskAMD",
        5013 => "StencilExportEXT",
        5015 => "ImageReadWriteLodAMD",
        5016 => "Int64ImageEXT",
        5055 => "ShaderClockKHR",
        5087 => "QuadControlKHR",
        5116 => "BFloat16TypeKHR",
        5117 => "BFloat16DotProductKHR",
        5118 => "BFloat16CooperativeMatrixKHR",
        5288 => "ComputeDerivativeGroupQuadsKHR",
        5297 => "GroupNonUniformPartitionedNV",
        5301 => "ShaderNonUniform",
        5302 => "RuntimeDescriptorArray",
        5303 => "InputAttachmentArrayDynamicIndexing",
        5304 => "UniformTexelBufferArrayDynamicIndexing",
        5305 => "StorageTexelBufferArrayDynamicIndexing",
        5306 => "UniformBufferArrayNonUniformIndexing",
        5307 => "SampledImageArrayNonUniformIndexing",
        5308 => "StorageBufferArrayNonUniformIndexing",
        5309 => "StorageImageArrayNonUniformIndexing",
        5310 => "InputAttachmentArrayNonUniformIndexing",
        5311 => "UniformTexelBufferArrayNonUniformIndexing",
        5312 => "StorageTexelBufferArrayNonUniformIndexing",
        5345 => "VulkanMemoryModel",
        5346 => "VulkanMemoryModelDeviceScope",
        5347 => "PhysicalStorageBufferAddresses",
        5350 => "ComputeDerivativeGroupLinearKHR",
        5357 => "CooperativeMatrixNV",
        5373 => "ShaderSMBuiltinsNV",
        5379 => "DemoteToHelperInvocation",
        5394 => "CooperativeVectorNV",
        5404 => "AtomicFloat16VectorNV",
        5414 => "RawAccessChainsNV",
        5430 => "CooperativeMatrixReductionsNV",
        5431 => "CooperativeMatrixConversionsNV",
        5432 => "CooperativeMatrixPerElementOperationsNV",
        5433 => "CooperativeMatrixTensorAddressingNV",
        5434 => "CooperativeMatrixBlockLoadsNV",
        5439 => "TensorAddressingNV",
        5568 => "SubgroupShuffleINTEL",
        5569 => "SubgroupBufferBlockIOINTEL",
        5584 => "IntegerFunctions2INTEL",
        5612 => "AtomicFloat32MinMaxEXT",
        5613 => "AtomicFloat64MinMaxEXT",
        5616 => "AtomicFloat16MinMaxEXT",
        5629 => "ExpectAssumeKHR",
        6016 => "DotProductInputAll",
        6017 => "DotProductInput4x8Bit",
        6018 => "DotProductInput4x8BitPacked",
        6019 => "DotProduct",
        6020 => "RayCullMaskKHR",
        6022 => "CooperativeMatrixKHR",
        6024 => "ReplicatedCompositesEXT",
        6025 => "BitInstructions",
        6026 => "GroupNonUniformRotateKHR",
        6029 => "FloatControls2",
        6033 => "AtomicFloat32AddEXT",
        6034 => "AtomicFloat64AddEXT",
        6095 => "AtomicFloat16AddEXT",
        6400 => "GroupUniformArithmeticKHR",
        _ => return None,
    })
}

/// Reflects a SPIR-V module given as the bytes of a `.spv` file (little-endian words; a
/// big-endian module, recognised by its byte-swapped magic number, is accepted too).
pub fn reflect(spirv: &[u8]) -> std::result::Result<Reflection, ReflectError> {
    let words = decode_words(spirv)?;
    let mut module = Module::new(words[3]);
    let mut pos = HEADER_WORDS;
    while pos < words.len() {
        let first = words[pos];
        let word_count = (first >> 16) as usize;
        let opcode = first & 0xffff;
        if word_count == 0 {
            return Err(ReflectError::ZeroWordCount { word: pos });
        }
        let remaining = words.len() - pos;
        if word_count > remaining {
            return Err(ReflectError::TruncatedInstruction { word: pos, opcode, word_count, remaining });
        }
        module.instruction(&Inst { opcode, word: pos, ops: &words[pos + 1..pos + word_count] })?;
        pos += word_count;
    }
    module.apply_decoration_groups();
    module.finish()
}

/// Splits the bytes into words, in the byte order the magic number says.
fn decode_words(bytes: &[u8]) -> Result<Vec<u32>> {
    if bytes.len() < HEADER_WORDS * 4 {
        return Err(ReflectError::TooShort { len: bytes.len() });
    }
    if !bytes.len().is_multiple_of(4) {
        return Err(ReflectError::NotWordAligned { len: bytes.len() });
    }
    let first = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let big_endian = if u32::from_le_bytes(first) == MAGIC {
        false
    } else if u32::from_be_bytes(first) == MAGIC {
        true
    } else {
        return Err(ReflectError::BadMagic { magic: u32::from_le_bytes(first) });
    };
    Ok(bytes
        .chunks_exact(4)
        .map(|c| {
            let b = [c[0], c[1], c[2], c[3]];
            if big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
        })
        .collect())
}

/// One instruction: its opcode, where it starts, and its operand words (after the first word).
struct Inst<'a> {
    opcode: u32,
    word: usize,
    ops: &'a [u32],
}

impl Inst<'_> {
    fn missing(&self) -> ReflectError {
        ReflectError::MissingOperand { word: self.word, opcode: self.opcode, word_count: self.ops.len() + 1 }
    }

    /// Operand `i` as a literal.
    fn lit(&self, i: usize) -> Result<u32> {
        self.ops.get(i).copied().ok_or_else(|| self.missing())
    }

    /// Absolute word offset of operand `i`.
    fn at(&self, i: usize) -> usize {
        self.word + 1 + i
    }

    /// Operand `i` as an id, checked against the bound.
    fn id(&self, i: usize, bound: u32) -> Result<u32> {
        let id = self.lit(i)?;
        check_id(id, self.at(i), bound)?;
        Ok(id)
    }

    /// Operands `from..` as ids, checked against the bound.
    fn ids_from(&self, from: usize, bound: u32) -> Result<Vec<u32>> {
        let rest = self.ops.get(from..).unwrap_or(&[]);
        rest.iter().enumerate().map(|(k, &id)| check_id(id, self.at(from + k), bound).map(|()| id)).collect()
    }

    /// A literal string starting at operand `i`.
    fn string(&self, i: usize) -> Result<String> {
        let rest = self.ops.get(i..).filter(|r| !r.is_empty()).ok_or_else(|| self.missing())?;
        let mut bytes = Vec::new();
        for w in rest {
            for b in w.to_le_bytes() {
                if b == 0 {
                    return String::from_utf8(bytes)
                        .map_err(|_| ReflectError::BadString { word: self.at(i), problem: "is not valid UTF-8" });
                }
                bytes.push(b);
            }
        }
        Err(ReflectError::BadString { word: self.at(i), problem: "runs past the end of its instruction (no NUL)" })
    }
}

fn check_id(id: u32, word: usize, bound: u32) -> Result<()> {
    if id == 0 {
        Err(ReflectError::ZeroId { word })
    } else if id >= bound {
        Err(ReflectError::IdOutOfBounds { id, word, bound })
    } else {
        Ok(())
    }
}

/// A decoration: its number, literal operands, and the word of the instruction that applied it.
#[derive(Clone)]
struct Deco {
    kind: u32,
    args: Vec<u32>,
    word: usize,
}

#[derive(Clone, Copy)]
enum Ty {
    Bool,
    Int {
        width: u32,
        signed: bool,
    },
    Float {
        width: u32,
    },
    Vector {
        component: u32,
        count: u32,
    },
    Matrix {
        column: u32,
        count: u32,
    },
    Array {
        element: u32,
        length: u32,
    },
    RuntimeArray {
        element: u32,
    },
    Struct,
    Pointer {
        class: u32,
        pointee: u32,
    },
    /// Any other type (void, image, sampler, function, ...).
    Other,
}

enum Const {
    Bool {
        value: bool,
        spec: bool,
    },
    Scalar {
        ty: u32,
        lo: u32,
        hi: Option<u32>,
        spec: bool,
    },
    Composite {
        parts: Vec<u32>,
        spec: bool,
    },
    /// OpConstantNull or OpSpecConstantOp: no value known here.
    Opaque {
        spec: bool,
    },
}

struct Var {
    id: u32,
    ty: u32,
    class: u32,
    word: usize,
}

struct Mode {
    entry: u32,
    mode: u32,
    args: Vec<u32>,
    word: usize,
}

/// What the instruction walk collects.
struct Module {
    bound: u32,
    names: HashMap<u32, String>,
    decos: HashMap<u32, Vec<Deco>>,
    member_decos: HashMap<(u32, u32), Vec<Deco>>,
    group_targets: Vec<(u32, Vec<u32>)>,
    group_member_targets: Vec<(u32, Vec<(u32, u32)>)>,
    /// Types with the word of their definition.
    types: HashMap<u32, (Ty, usize)>,
    /// Struct member type ids.
    struct_members: HashMap<u32, Vec<u32>>,
    consts: HashMap<u32, (Const, usize)>,
    vars: Vec<Var>,
    /// Word of the defining instruction of every result id seen, for duplicate detection.
    defined: HashMap<u32, usize>,
    entry_points: Vec<(EntryPoint, u32, usize)>,
    modes: Vec<Mode>,
    capabilities: Vec<u32>,
    extensions: Vec<String>,
}

impl Module {
    fn new(bound: u32) -> Self {
        Module {
            bound,
            names: HashMap::new(),
            decos: HashMap::new(),
            member_decos: HashMap::new(),
            group_targets: Vec::new(),
            group_member_targets: Vec::new(),
            types: HashMap::new(),
            struct_members: HashMap::new(),
            consts: HashMap::new(),
            vars: Vec::new(),
            defined: HashMap::new(),
            entry_points: Vec::new(),
            modes: Vec::new(),
            capabilities: Vec::new(),
            extensions: Vec::new(),
        }
    }

    fn define(&mut self, id: u32, word: usize) -> Result<()> {
        if self.defined.insert(id, word).is_some() {
            return Err(ReflectError::DuplicateId { id, word });
        }
        Ok(())
    }

    fn add_type(&mut self, id: u32, ty: Ty, word: usize) -> Result<()> {
        self.define(id, word)?;
        self.types.insert(id, (ty, word));
        Ok(())
    }

    fn add_const(&mut self, id: u32, c: Const, word: usize) -> Result<()> {
        self.define(id, word)?;
        self.consts.insert(id, (c, word));
        Ok(())
    }

    /// Records what one instruction says, if it matters.
    fn instruction(&mut self, inst: &Inst) -> Result<()> {
        let b = self.bound;
        let w = inst.word;
        match inst.opcode {
            op::CAPABILITY => self.capabilities.push(inst.lit(0)?),
            op::EXTENSION => self.extensions.push(inst.string(0)?),
            op::ENTRY_POINT => {
                let execution_model = inst.lit(0)?;
                let id = inst.id(1, b)?;
                let name = inst.string(2)?;
                self.entry_points.push((EntryPoint { name, execution_model }, id, w));
            }
            op::EXECUTION_MODE | op::EXECUTION_MODE_ID => {
                let entry = inst.id(0, b)?;
                let mode = inst.lit(1)?;
                let args = if inst.opcode == op::EXECUTION_MODE_ID {
                    inst.ids_from(2, b)?
                } else {
                    inst.ops.get(2..).unwrap_or(&[]).to_vec()
                };
                self.modes.push(Mode { entry, mode, args, word: w });
            }
            op::NAME => {
                let id = inst.id(0, b)?;
                let name = inst.string(1)?;
                self.names.entry(id).or_insert(name);
            }
            op::DECORATE | op::DECORATE_ID | op::DECORATE_STRING => {
                let id = inst.id(0, b)?;
                let kind = inst.lit(1)?;
                let args = inst.ops.get(2..).unwrap_or(&[]).to_vec();
                self.decos.entry(id).or_default().push(Deco { kind, args, word: w });
            }
            op::MEMBER_DECORATE | op::MEMBER_DECORATE_STRING => {
                let id = inst.id(0, b)?;
                let member = inst.lit(1)?;
                let kind = inst.lit(2)?;
                let args = inst.ops.get(3..).unwrap_or(&[]).to_vec();
                self.member_decos.entry((id, member)).or_default().push(Deco { kind, args, word: w });
            }
            op::GROUP_DECORATE => {
                let group = inst.id(0, b)?;
                let targets = inst.ids_from(1, b)?;
                self.group_targets.push((group, targets));
            }
            op::GROUP_MEMBER_DECORATE => {
                let group = inst.id(0, b)?;
                if inst.ops.len().is_multiple_of(2) {
                    return Err(inst.missing());
                }
                let mut targets = Vec::new();
                for k in (1..inst.ops.len()).step_by(2) {
                    targets.push((inst.id(k, b)?, inst.lit(k + 1)?));
                }
                self.group_member_targets.push((group, targets));
            }
            op::TYPE_BOOL => self.add_type(inst.id(0, b)?, Ty::Bool, w)?,
            op::TYPE_INT => {
                let id = inst.id(0, b)?;
                let ty = Ty::Int { width: inst.lit(1)?, signed: inst.lit(2)? != 0 };
                self.add_type(id, ty, w)?;
            }
            op::TYPE_FLOAT => {
                let id = inst.id(0, b)?;
                self.add_type(id, Ty::Float { width: inst.lit(1)? }, w)?;
            }
            op::TYPE_VECTOR | op::TYPE_MATRIX => {
                let id = inst.id(0, b)?;
                let inner = inst.id(1, b)?;
                let count = inst.lit(2)?;
                let ty = if inst.opcode == op::TYPE_VECTOR {
                    Ty::Vector { component: inner, count }
                } else {
                    Ty::Matrix { column: inner, count }
                };
                self.add_type(id, ty, w)?;
            }
            op::TYPE_ARRAY => {
                let id = inst.id(0, b)?;
                let ty = Ty::Array { element: inst.id(1, b)?, length: inst.id(2, b)? };
                self.add_type(id, ty, w)?;
            }
            op::TYPE_RUNTIME_ARRAY => {
                let id = inst.id(0, b)?;
                let element = inst.id(1, b)?;
                self.add_type(id, Ty::RuntimeArray { element }, w)?;
            }
            op::TYPE_STRUCT => {
                let id = inst.id(0, b)?;
                let members = inst.ids_from(1, b)?;
                self.add_type(id, Ty::Struct, w)?;
                self.struct_members.insert(id, members);
            }
            op::TYPE_POINTER => {
                let id = inst.id(0, b)?;
                let ty = Ty::Pointer { class: inst.lit(1)?, pointee: inst.id(2, b)? };
                self.add_type(id, ty, w)?;
            }
            op::TYPE_VOID
            | op::TYPE_IMAGE
            | op::TYPE_SAMPLER
            | op::TYPE_SAMPLED_IMAGE
            | op::TYPE_OPAQUE
            | op::TYPE_FUNCTION
            | op::TYPE_RAY_QUERY_KHR
            | op::TYPE_COOPERATIVE_MATRIX_KHR
            | op::TYPE_ACCELERATION_STRUCTURE_KHR => self.add_type(inst.id(0, b)?, Ty::Other, w)?,
            op::CONSTANT_TRUE | op::CONSTANT_FALSE | op::SPEC_CONSTANT_TRUE | op::SPEC_CONSTANT_FALSE => {
                inst.id(0, b)?;
                let id = inst.id(1, b)?;
                let value = matches!(inst.opcode, op::CONSTANT_TRUE | op::SPEC_CONSTANT_TRUE);
                let spec = matches!(inst.opcode, op::SPEC_CONSTANT_TRUE | op::SPEC_CONSTANT_FALSE);
                self.add_const(id, Const::Bool { value, spec }, w)?;
            }
            op::CONSTANT | op::SPEC_CONSTANT => {
                let ty = inst.id(0, b)?;
                let id = inst.id(1, b)?;
                let lo = inst.lit(2)?;
                let hi = inst.ops.get(3).copied();
                self.add_const(id, Const::Scalar { ty, lo, hi, spec: inst.opcode == op::SPEC_CONSTANT }, w)?;
            }
            op::CONSTANT_COMPOSITE | op::SPEC_CONSTANT_COMPOSITE => {
                inst.id(0, b)?;
                let id = inst.id(1, b)?;
                let parts = inst.ids_from(2, b)?;
                self.add_const(id, Const::Composite { parts, spec: inst.opcode == op::SPEC_CONSTANT_COMPOSITE }, w)?;
            }
            op::CONSTANT_NULL | op::SPEC_CONSTANT_OP => {
                inst.id(0, b)?;
                let id = inst.id(1, b)?;
                self.add_const(id, Const::Opaque { spec: inst.opcode == op::SPEC_CONSTANT_OP }, w)?;
            }
            op::VARIABLE => {
                let ty = inst.id(0, b)?;
                let id = inst.id(1, b)?;
                let class = inst.lit(2)?;
                if class != sc::FUNCTION {
                    self.define(id, w)?;
                    self.vars.push(Var { id, ty, class, word: w });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Copies the decorations of decoration groups (OpGroupDecorate, OpGroupMemberDecorate) to
    /// their targets.
    fn apply_decoration_groups(&mut self) {
        for (group, targets) in std::mem::take(&mut self.group_targets) {
            let Some(ds) = self.decos.get(&group).cloned() else { continue };
            for t in targets {
                self.decos.entry(t).or_default().extend(ds.iter().cloned());
            }
        }
        for (group, targets) in std::mem::take(&mut self.group_member_targets) {
            let Some(ds) = self.decos.get(&group).cloned() else { continue };
            for t in targets {
                self.member_decos.entry(t).or_default().extend(ds.iter().cloned());
            }
        }
    }

    fn deco(&self, id: u32, kind: u32) -> Option<&Deco> {
        self.decos.get(&id)?.iter().find(|d| d.kind == kind)
    }

    fn has_deco(&self, id: u32, kind: u32) -> bool {
        self.deco(id, kind).is_some()
    }

    /// The first literal operand of decoration `kind` on `id`, if decorated.
    fn deco_value(&self, id: u32, kind: u32) -> Result<Option<u32>> {
        deco_arg(self.deco(id, kind))
    }

    fn member_deco(&self, id: u32, member: u32, kind: u32) -> Option<&Deco> {
        self.member_decos.get(&(id, member))?.iter().find(|d| d.kind == kind)
    }

    /// The name of `id`, None if absent or empty.
    fn name(&self, id: u32) -> Option<String> {
        self.names.get(&id).filter(|n| !n.is_empty()).cloned()
    }

    fn ty(&self, id: u32, word: usize) -> Result<(Ty, usize)> {
        self.types.get(&id).copied().ok_or(ReflectError::WrongKind { id, word, expected: "a type" })
    }

    fn finish(self) -> Result<Reflection> {
        let entry_points: Vec<EntryPoint> = self.entry_points.iter().map(|(e, _, _)| e.clone()).collect();
        let Some((compute, compute_id, compute_word)) =
            self.entry_points.iter().find(|(e, _, _)| e.execution_model == EXECUTION_MODEL_GLCOMPUTE)
        else {
            let found = if entry_points.is_empty() {
                "none".to_string()
            } else {
                entry_points
                    .iter()
                    .map(|e| format!("`{}` (model {})", e.name, e.execution_model))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(ReflectError::NoComputeEntryPoint { found });
        };
        let local_size = self.local_size(&compute.name, *compute_id, *compute_word)?;
        let bindings = self.bindings()?;
        let push_constant_bytes = self.push_constant_bytes()?;
        let spec_constants = self.spec_constants()?;
        Ok(Reflection {
            entry_points,
            local_size,
            bindings,
            push_constant_bytes,
            spec_constants,
            capabilities: self.capabilities,
            extensions: self.extensions,
        })
    }

    /// The workgroup size: a constant decorated BuiltIn WorkgroupSize overrides the execution
    /// modes; else ExecutionModeId LocalSizeId; else ExecutionMode LocalSize.
    fn local_size(&self, name: &str, entry: u32, entry_word: usize) -> Result<LocalSize> {
        let builtin = self.workgroup_size_constant();
        if let Some((id, (c, word))) = builtin {
            let Const::Composite { parts, .. } = c else {
                return Err(ReflectError::BadWorkgroupSize {
                    word: *word,
                    problem: format!("%{id} is decorated WorkgroupSize but is not a composite constant"),
                });
            };
            let [x, y, z] = parts[..] else {
                return Err(ReflectError::BadWorkgroupSize {
                    word: *word,
                    problem: format!("WorkgroupSize %{id} has {} components, not 3", parts.len()),
                });
            };
            return Ok(LocalSize { x: self.dim(x, *word)?, y: self.dim(y, *word)?, z: self.dim(z, *word)? });
        }
        let modes = || self.modes.iter().filter(|m| m.entry == entry);
        if let Some(m) = modes().find(|m| m.mode == MODE_LOCAL_SIZE_ID) {
            let [x, y, z] = three(m)?;
            return Ok(LocalSize { x: self.dim(x, m.word)?, y: self.dim(y, m.word)?, z: self.dim(z, m.word)? });
        }
        if let Some(m) = modes().find(|m| m.mode == MODE_LOCAL_SIZE) {
            let [x, y, z] = three(m)?;
            return Ok(LocalSize { x: Dim::Literal(x), y: Dim::Literal(y), z: Dim::Literal(z) });
        }
        Err(ReflectError::NoLocalSize { name: name.to_string(), word: entry_word })
    }

    /// The constant decorated BuiltIn WorkgroupSize (the first, should there be several).
    fn workgroup_size_constant(&self) -> Option<(&u32, &(Const, usize))> {
        self.consts
            .iter()
            .filter(|(id, _)| {
                self.decos.get(id).is_some_and(|ds| {
                    ds.iter().any(|d| d.kind == deco::BUILT_IN && d.args.first() == Some(&BUILTIN_WORKGROUP_SIZE))
                })
            })
            .min_by_key(|(_, (_, word))| *word)
    }

    /// One workgroup dimension from a (spec) constant id.
    fn dim(&self, id: u32, word: usize) -> Result<Dim> {
        match self.consts.get(&id) {
            Some((Const::Scalar { lo, spec, .. }, _)) => {
                let spec_id = if *spec { self.deco_value(id, deco::SPEC_ID)? } else { None };
                Ok(match spec_id {
                    Some(spec_id) => Dim::Spec { id: spec_id, default: *lo },
                    None => Dim::Literal(*lo),
                })
            }
            _ => Err(ReflectError::BadWorkgroupSize {
                word,
                problem: format!("component %{id} is not a scalar integer constant"),
            }),
        }
    }

    /// Descriptor bindings, merged per (set, binding) and sorted.
    fn bindings(&self) -> Result<Vec<Binding>> {
        let mut out: BTreeMap<(u32, u32), Binding> = BTreeMap::new();
        for var in &self.vars {
            let set = self.deco_value(var.id, deco::DESCRIPTOR_SET)?;
            let binding = match (self.deco_value(var.id, deco::BINDING)?, set) {
                (Some(b), _) => b,
                (None, Some(_)) => return Err(ReflectError::MissingBinding { word: var.word }),
                (None, None) => continue,
            };
            let set = set.unwrap_or(0);
            let pointee = match self.types.get(&var.ty) {
                Some((Ty::Pointer { pointee, .. }, _)) => *pointee,
                _ => return Err(ReflectError::WrongKind { id: var.ty, word: var.word, expected: "a pointer type" }),
            };
            // Unwrap descriptor arrays down to the block struct, if any.
            let mut block = None;
            let mut id = pointee;
            for _ in 0..MAX_TYPE_DEPTH {
                match self.types.get(&id) {
                    Some((Ty::Array { element, .. } | Ty::RuntimeArray { element }, _)) => id = *element,
                    Some((Ty::Struct, _)) => {
                        block = Some(id);
                        break;
                    }
                    _ => break,
                }
            }
            let kind = match (var.class, block) {
                (sc::STORAGE_BUFFER, _) => BindingKind::StorageBuffer,
                (sc::UNIFORM, Some(s)) if self.has_deco(s, deco::BUFFER_BLOCK) => BindingKind::StorageBuffer,
                (sc::UNIFORM, Some(s)) if self.has_deco(s, deco::BLOCK) => BindingKind::UniformBuffer,
                (class, _) => BindingKind::Other(class),
            };
            let all_members = |kind: u32| {
                block.is_some_and(|s| {
                    let n = self.struct_members.get(&s).map_or(0, Vec::len) as u32;
                    n > 0 && (0..n).all(|m| self.member_deco(s, m, kind).is_some())
                })
            };
            let non_writable = self.has_deco(var.id, deco::NON_WRITABLE) || all_members(deco::NON_WRITABLE);
            let non_readable = self.has_deco(var.id, deco::NON_READABLE) || all_members(deco::NON_READABLE);
            let name = self.name(var.id).or_else(|| block.and_then(|s| self.name(s)));
            match out.get_mut(&(set, binding)) {
                Some(prev) => {
                    if prev.kind != kind {
                        return Err(ReflectError::ConflictingBinding {
                            set,
                            binding,
                            first: prev.kind,
                            second: kind,
                            word: var.word,
                        });
                    }
                    prev.non_writable &= non_writable;
                    prev.non_readable &= non_readable;
                    if prev.name.is_none() {
                        prev.name = name;
                    }
                }
                None => {
                    out.insert((set, binding), Binding { set, binding, kind, name, non_writable, non_readable });
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// The size of the push-constant block (the largest, should there be several variables).
    fn push_constant_bytes(&self) -> Result<Option<u32>> {
        let mut size: Option<u32> = None;
        let mut memo = HashMap::new();
        for var in self.vars.iter().filter(|v| v.class == sc::PUSH_CONSTANT) {
            let pointee = match self.types.get(&var.ty) {
                Some((Ty::Pointer { pointee, .. }, _)) => *pointee,
                _ => return Err(ReflectError::WrongKind { id: var.ty, word: var.word, expected: "a pointer type" }),
            };
            match self.types.get(&pointee) {
                Some((Ty::Struct, _)) => {}
                _ => return Err(ReflectError::NotAStruct { word: var.word, context: " (push-constant block)" }),
            }
            let bytes = self.struct_size(pointee, None, var.word, 0, &mut memo)?;
            let bytes = u32::try_from(bytes).map_err(|_| ReflectError::SizeOverflow { member: 0, word: var.word })?;
            size = Some(size.map_or(bytes, |s| s.max(bytes)));
        }
        Ok(size)
    }

    /// Size of a struct: the largest member Offset + member size. `member` is the top-level
    /// push-constant member this struct is inside (None for the block itself).
    fn struct_size(
        &self,
        id: u32,
        member: Option<u32>,
        at: usize,
        depth: u32,
        memo: &mut HashMap<(u32, Option<u32>, bool), u64>,
    ) -> Result<u64> {
        let (_, word) = self.ty(id, at)?;
        let members = self.struct_members.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        let mut size = 0u64;
        for (m, &member_ty) in members.iter().enumerate() {
            let m = m as u32;
            let top = member.unwrap_or(m);
            let offset = match self.member_deco(id, m, deco::OFFSET) {
                Some(d) => deco_arg(Some(d))?.unwrap_or(0),
                None => return Err(ReflectError::MissingOffset { member: top, id, word }),
            };
            let layout = Layout {
                matrix_stride: deco_arg(self.member_deco(id, m, deco::MATRIX_STRIDE))?,
                row_major: self.member_deco(id, m, deco::ROW_MAJOR).is_some(),
            };
            let msize = self.type_size(member_ty, layout, top, word, depth + 1, memo)?;
            let end = u64::from(offset).checked_add(msize).ok_or(ReflectError::SizeOverflow { member: top, word })?;
            size = size.max(end);
        }
        Ok(size)
    }

    /// Size in bytes of a type inside a push-constant block.
    fn type_size(
        &self,
        id: u32,
        layout: Layout,
        member: u32,
        at: usize,
        depth: u32,
        memo: &mut HashMap<(u32, Option<u32>, bool), u64>,
    ) -> Result<u64> {
        let (ty, word) = self.ty(id, at)?;
        if depth > MAX_TYPE_DEPTH {
            return Err(ReflectError::TypeTooDeep { id, word, limit: MAX_TYPE_DEPTH });
        }
        let key = (id, layout.matrix_stride, layout.row_major);
        if let Some(&s) = memo.get(&key) {
            return Ok(s);
        }
        let overflow = || ReflectError::SizeOverflow { member, word };
        let size = match ty {
            Ty::Bool => 4,
            Ty::Int { width, .. } | Ty::Float { width } => u64::from(width.div_ceil(8)),
            Ty::Vector { component, count } => {
                let c = self.type_size(component, layout, member, word, depth + 1, memo)?;
                c.checked_mul(u64::from(count)).ok_or_else(overflow)?
            }
            Ty::Matrix { column, count } => {
                let (rows, comp) = match self.ty(column, word)? {
                    (Ty::Vector { component, count }, _) => (count, component),
                    _ => return Err(ReflectError::WrongKind { id: column, word, expected: "a vector type" }),
                };
                let comp_size = self.type_size(comp, layout, member, word, depth + 1, memo)?;
                // Column-major: `count` columns, MatrixStride apart; row-major: `rows` rows.
                let (major, minor) = if layout.row_major { (rows, count) } else { (count, rows) };
                let vector = comp_size.checked_mul(u64::from(minor)).ok_or_else(overflow)?;
                let stride = layout.matrix_stride.map_or(vector, u64::from);
                stride.checked_mul(u64::from(major)).ok_or_else(overflow)?
            }
            Ty::Array { element, length } => {
                let n = self.array_length(length, member, word)?;
                let element_size = self.type_size(element, layout, member, word, depth + 1, memo)?;
                let stride = self.deco_value(id, deco::ARRAY_STRIDE)?.map_or(element_size, u64::from);
                stride.checked_mul(n).ok_or_else(overflow)?
            }
            Ty::RuntimeArray { .. } => return Err(ReflectError::RuntimeArray { member, word }),
            Ty::Struct => self.struct_size(id, Some(member), word, depth + 1, memo)?,
            Ty::Pointer { class: sc::PHYSICAL_STORAGE_BUFFER, .. } => 8,
            Ty::Pointer { .. } => {
                return Err(ReflectError::UnsizedType { member, word, what: "a logical pointer" });
            }
            Ty::Other => return Err(ReflectError::UnsizedType { member, word, what: "an opaque type" }),
        };
        memo.insert(key, size);
        Ok(size)
    }

    /// The length of an array type from its length constant.
    fn array_length(&self, id: u32, member: u32, word: usize) -> Result<u64> {
        match self.consts.get(&id) {
            Some((Const::Scalar { spec: false, lo, hi, ty }, _)) => {
                let wide = matches!(self.types.get(ty), Some((Ty::Int { width, .. }, _)) if *width > 32);
                let hi = if wide { hi.unwrap_or(0) } else { 0 };
                Ok(u64::from(*lo) | (u64::from(hi) << 32))
            }
            Some((Const::Scalar { spec: true, .. }, _))
            | Some((Const::Opaque { spec: true }, _))
            | Some((Const::Composite { spec: true, .. }, _))
            | Some((Const::Bool { spec: true, .. }, _)) => Err(ReflectError::SpecConstantArrayLength { member, word }),
            _ => Err(ReflectError::WrongKind { id, word, expected: "an integer constant (array length)" }),
        }
    }

    /// Specialization constants, one per SpecId, sorted by id.
    fn spec_constants(&self) -> Result<Vec<SpecConstant>> {
        let mut consts: Vec<(&u32, &(Const, usize))> = self.consts.iter().collect();
        consts.sort_by_key(|(_, (_, word))| *word);
        // Constants that only size the workgroup: glslc gives `local_size_x_id = N` its own unnamed
        // constant even when `constant_id = N` is declared too. One entry is kept per SpecId,
        // preferring a named constant, then one that is not a workgroup-size component (its
        // default is in `local_size` anyway), then the first.
        let mut workgroup_parts: HashSet<u32> = HashSet::new();
        if let Some((_, (Const::Composite { parts, .. }, _))) = self.workgroup_size_constant() {
            workgroup_parts.extend(parts);
        }
        for m in self.modes.iter().filter(|m| m.mode == MODE_LOCAL_SIZE_ID) {
            workgroup_parts.extend(&m.args);
        }
        let mut out: BTreeMap<u32, (SpecConstant, (bool, bool))> = BTreeMap::new();
        for (&id, (c, word)) in consts {
            let word = *word;
            if !matches!(c, Const::Bool { spec: true, .. } | Const::Scalar { spec: true, .. }) {
                continue;
            }
            let Some(spec_id) = self.deco_value(id, deco::SPEC_ID)? else { continue };
            let kind = match c {
                Const::Bool { value, .. } => SpecKind::Bool { default: *value },
                Const::Scalar { ty, lo, hi, .. } => {
                    let bad = |problem: String| ReflectError::BadSpecConstant { spec_id, word, problem };
                    let (width, int) = match self.ty(*ty, word)?.0 {
                        Ty::Int { width, signed } => (width, Some(signed)),
                        Ty::Float { width } => (width, None),
                        _ => return Err(bad("its type is neither an integer nor a float".into())),
                    };
                    if width == 0 || width > 64 {
                        return Err(bad(format!("unsupported width {width}")));
                    }
                    let hi = match (width > 32, hi) {
                        (false, _) => 0,
                        (true, Some(h)) => *h,
                        (true, None) => return Err(bad(format!("a {width}-bit value needs two literal words"))),
                    };
                    let mask = if width == 64 { u64::MAX } else { (1u64 << width) - 1 };
                    let bits = (u64::from(*lo) | (u64::from(hi) << 32)) & mask;
                    match int {
                        Some(signed) => SpecKind::Int { width, signed, default: bits },
                        None => SpecKind::Float { width, default_bits: bits },
                    }
                }
                _ => continue,
            };
            let name = self.name(id);
            let rank = (name.is_some(), !workgroup_parts.contains(&id));
            let this = SpecConstant { id: spec_id, name, kind };
            match out.get_mut(&spec_id) {
                Some((prev, prev_rank)) => {
                    if !prev.kind.same_shape(&kind) {
                        return Err(ReflectError::ConflictingSpecId { spec_id, first: prev.kind, second: kind, word });
                    }
                    if rank > *prev_rank {
                        (*prev, *prev_rank) = (this, rank);
                    }
                }
                None => {
                    out.insert(spec_id, (this, rank));
                }
            }
        }
        Ok(out.into_values().map(|(s, _)| s).collect())
    }
}

/// Matrix layout decorations of a struct member, passed down to the matrices inside it.
#[derive(Clone, Copy)]
struct Layout {
    matrix_stride: Option<u32>,
    row_major: bool,
}

fn deco_arg(d: Option<&Deco>) -> Result<Option<u32>> {
    match d {
        None => Ok(None),
        Some(d) => d
            .args
            .first()
            .copied()
            .map(Some)
            .ok_or(ReflectError::DecorationMissingOperand { decoration: d.kind, word: d.word }),
    }
}

/// The three operands of a LocalSize / LocalSizeId execution mode.
fn three(m: &Mode) -> Result<[u32; 3]> {
    match m.args[..] {
        [x, y, z, ..] => Ok([x, y, z]),
        _ => Err(ReflectError::BadWorkgroupSize {
            word: m.word,
            problem: format!("execution mode {} has {} operands, not 3", m.mode, m.args.len()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Compiles GLSL compute source with glslc; None (after saying so) if glslc is missing.
    fn glslc(test: &str, src: &str, target_env: &str) -> Option<Vec<u8>> {
        glslc_with(test, src, target_env, &[])
    }

    /// [`glslc`] with extra arguments.
    fn glslc_with(test: &str, src: &str, target_env: &str, extra: &[&str]) -> Option<Vec<u8>> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vkdecode-reflect-{}-{test}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src_path = dir.join("shader.comp");
        let spv_path = dir.join("shader.spv");
        std::fs::write(&src_path, src).unwrap();
        let output = Command::new("glslc")
            .arg("-fshader-stage=compute")
            .arg(format!("--target-env={target_env}"))
            .args(extra)
            .arg(&src_path)
            .arg("-o")
            .arg(&spv_path)
            .output();
        let result = match output {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("glslc not found: skipping the GLSL part of `{test}`");
                None
            }
            Err(e) => panic!("cannot run glslc: {e}"),
            Ok(o) if !o.status.success() => {
                panic!("glslc failed for `{test}`:\n{}", String::from_utf8_lossy(&o.stderr))
            }
            Ok(_) => Some(std::fs::read(&spv_path).unwrap()),
        };
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn cap_names(r: &Reflection) -> Vec<&'static str> {
        r.capabilities.iter().map(|&c| capability_name(c).unwrap_or("?")).collect()
    }

    const BINDINGS_SRC: &str = r#"#version 450
layout(local_size_x = 64, local_size_y = 2, local_size_z = 1) in;
layout(set = 0, binding = 0) readonly buffer InBuf { float data_in[]; };
layout(set = 0, binding = 1) writeonly buffer OutBuf { float data_out[]; } out_buf;
layout(set = 1, binding = 3) uniform Params { uint n; float scale; } params;
layout(set = 0, binding = 2) buffer RW { uint counter; uint values[]; };
void main() {
    uint i = gl_GlobalInvocationID.x;
    if (i < params.n) { out_buf.data_out[i] = data_in[i] * params.scale; }
    atomicAdd(counter, 1);
    values[i] = counter;
}
"#;

    fn check_bindings(r: &Reflection) {
        let sb = BindingKind::StorageBuffer;
        let expected = vec![
            Binding {
                set: 0,
                binding: 0,
                kind: sb,
                name: Some("InBuf".into()),
                non_writable: true,
                non_readable: false,
            },
            Binding {
                set: 0,
                binding: 1,
                kind: sb,
                name: Some("out_buf".into()),
                non_writable: false,
                non_readable: true,
            },
            Binding { set: 0, binding: 2, kind: sb, name: Some("RW".into()), non_writable: false, non_readable: false },
            Binding {
                set: 1,
                binding: 3,
                kind: BindingKind::UniformBuffer,
                name: Some("params".into()),
                non_writable: false,
                non_readable: false,
            },
        ];
        assert_eq!(r.bindings, expected);
        assert_eq!(r.binding(1, 3).map(|b| b.kind), Some(BindingKind::UniformBuffer));
        assert_eq!(r.binding(0, 3), None);
        assert_eq!(r.push_constant_bytes, None);
        assert!(r.spec_constants.is_empty());
        let lit = Dim::Literal;
        assert_eq!(r.local_size, LocalSize { x: lit(64), y: lit(2), z: lit(1) });
        assert_eq!(r.entry(), Some(&EntryPoint { name: "main".into(), execution_model: 5 }));
        assert_eq!(cap_names(r), ["Shader"]);
    }

    #[test]
    fn bindings_storage_class_storage_buffer() {
        let Some(spv) = glslc("bindings", BINDINGS_SRC, "vulkan1.2") else { return };
        check_bindings(&reflect(&spv).unwrap());
    }

    #[test]
    fn bindings_old_style_buffer_block() {
        // SPIR-V 1.0: storage buffers are Uniform + BufferBlock.
        let Some(spv) = glslc("bindings_old", BINDINGS_SRC, "vulkan1.0") else { return };
        check_bindings(&reflect(&spv).unwrap());
    }

    #[test]
    fn big_endian_module_is_accepted() {
        let Some(spv) = glslc("big_endian", BINDINGS_SRC, "vulkan1.2") else { return };
        let swapped: Vec<u8> = spv.chunks_exact(4).flat_map(|c| [c[3], c[2], c[1], c[0]]).collect();
        assert_eq!(reflect(&swapped).unwrap(), reflect(&spv).unwrap());
    }

    #[test]
    fn aliased_bindings_are_merged() {
        let src = r#"#version 450
layout(local_size_x = 32) in;
layout(binding = 0) readonly buffer A { float a[]; };
layout(binding = 0) readonly buffer AV4 { vec4 a4[]; };
layout(binding = 1) writeonly buffer O { float o[]; };
layout(binding = 1) buffer OV4 { vec4 o4[]; };
void main() { o[0] = a[0] + a4[1].x; o4[1] = vec4(o4[2].x); }
"#;
        let Some(spv) = glslc("aliases", src, "vulkan1.2") else { return };
        let r = reflect(&spv).unwrap();
        assert_eq!(r.bindings.len(), 2);
        let (b0, b1) = (r.binding(0, 0).unwrap(), r.binding(0, 1).unwrap());
        assert_eq!((b0.name.as_deref(), b0.non_writable), (Some("A"), true));
        assert_eq!((b1.name.as_deref(), b1.non_readable, b1.non_writable), (Some("O"), false, false));
    }

    #[test]
    fn push_constant_size_std430() {
        let src = r#"#version 450
layout(local_size_x = 1) in;
layout(push_constant) uniform PC {
    uint a;       // offset 0
    float b;      // offset 4
    vec4 c;       // offset 16
    float arr[3]; // offset 32, stride 4
    uint last;    // offset 44
} pc;
layout(binding = 0) buffer B { float d[]; };
void main() { d[0] = float(pc.a) + pc.b + pc.c.w + pc.arr[2] + float(pc.last); }
"#;
        let Some(spv) = glslc("push_constant", src, "vulkan1.2") else { return };
        assert_eq!(reflect(&spv).unwrap().push_constant_bytes, Some(48));
    }

    #[test]
    fn push_constant_size_matrix_and_nested_struct() {
        let src = r#"#version 450
layout(local_size_x = 1) in;
struct Inner { vec3 v; float w; };
layout(push_constant) uniform PC {
    mat4 m;         // offset 0, 64 bytes
    Inner inner[2]; // offset 64, stride 16
    uvec2 tail;     // offset 96
} pc;
layout(binding = 0) buffer B { float d[]; };
void main() { d[0] = pc.m[3].w + pc.inner[1].v.z + pc.inner[1].w + float(pc.tail.y); }
"#;
        let Some(spv) = glslc("push_constant_nested", src, "vulkan1.2") else { return };
        assert_eq!(reflect(&spv).unwrap().push_constant_bytes, Some(104));
    }

    #[test]
    fn push_constant_spec_length_array_is_an_error() {
        let src = r#"#version 450
layout(local_size_x = 1) in;
layout(constant_id = 0) const uint N = 4;
layout(push_constant) uniform PC { uint a; float arr[N]; } pc;
layout(binding = 0) buffer B { float d[]; };
void main() { d[0] = pc.arr[1] + float(pc.a); }
"#;
        let Some(spv) = glslc("push_constant_spec", src, "vulkan1.2") else { return };
        let err = reflect(&spv).unwrap_err();
        assert!(matches!(err, ReflectError::SpecConstantArrayLength { member: 1, .. }), "{err:?}");
        assert!(err.to_string().starts_with("push-constant member 1 has an array of spec-constant length"), "{err}");
    }

    #[test]
    fn spec_constants_and_spec_local_size() {
        let src = r#"#version 450
layout(local_size_x_id = 0, local_size_y = 4, local_size_z_id = 5) in;
layout(constant_id = 0) const uint WG = 128;
layout(constant_id = 1) const int Neg = -3;
layout(constant_id = 2) const float Scale = 1.5;
layout(constant_id = 3) const bool Enable = true;
layout(constant_id = 4) const bool Disable = false;
layout(binding = 0) buffer B { float d[]; };
void main() {
    float v = float(WG) + float(Neg) * Scale;
    if (Enable && !Disable) { d[gl_GlobalInvocationID.x] = v; }
}
"#;
        let Some(spv) = glslc("spec_constants", src, "vulkan1.2") else { return };
        let r = reflect(&spv).unwrap();
        let expected = vec![
            SpecConstant {
                id: 0,
                name: Some("WG".into()),
                kind: SpecKind::Int { width: 32, signed: false, default: 128 },
            },
            SpecConstant {
                id: 1,
                name: Some("Neg".into()),
                kind: SpecKind::Int { width: 32, signed: true, default: u64::from((-3i32) as u32) },
            },
            SpecConstant {
                id: 2,
                name: Some("Scale".into()),
                kind: SpecKind::Float { width: 32, default_bits: u64::from(1.5f32.to_bits()) },
            },
            SpecConstant { id: 3, name: Some("Enable".into()), kind: SpecKind::Bool { default: true } },
            SpecConstant { id: 4, name: Some("Disable".into()), kind: SpecKind::Bool { default: false } },
            SpecConstant { id: 5, name: None, kind: SpecKind::Int { width: 32, signed: false, default: 1 } },
        ];
        assert_eq!(r.spec_constants, expected);
        assert_eq!(
            r.local_size,
            LocalSize { x: Dim::Spec { id: 0, default: 1 }, y: Dim::Literal(4), z: Dim::Spec { id: 5, default: 1 } }
        );
        assert_eq!(r.local_size.x.default_value(), 1);
    }

    #[test]
    fn local_size_id_sharing_a_constant_id() {
        // As llama.cpp does: the workgroup size and `constant_id = 0` share SpecId 0; glslc emits
        // two spec constants with SpecId 0 (defaults 1 and 128). The declared one is reported.
        let src = r#"#version 450
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WorkGroupSize = 128;
layout(binding = 0) buffer B { uint d[]; };
void main() { d[gl_GlobalInvocationID.x] = WorkGroupSize; }
"#;
        let int = |default| SpecKind::Int { width: 32, signed: false, default };
        for (args, name) in [(&[][..], Some("WorkGroupSize".to_string())), (&["-O"][..], None)] {
            let Some(spv) = glslc_with("shared_spec_id", src, "vulkan1.2", args) else { return };
            let r = reflect(&spv).unwrap();
            assert_eq!(r.spec_constants, [SpecConstant { id: 0, name, kind: int(128) }], "glslc {args:?}");
            assert_eq!(r.local_size.x, Dim::Spec { id: 0, default: 1 });
        }
    }

    #[test]
    fn float16_capabilities() {
        let src = r#"#version 450
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
layout(local_size_x = 64) in;
layout(binding = 0) buffer B { float16_t h[]; };
void main() { uint i = gl_GlobalInvocationID.x; h[i] = h[i] * float16_t(2.0); }
"#;
        let Some(spv) = glslc("float16", src, "vulkan1.2") else { return };
        let r = reflect(&spv).unwrap();
        let names = cap_names(&r);
        assert!(names.contains(&"Float16"), "{names:?}");
        assert!(names.contains(&"StorageBuffer16BitAccess"), "{names:?}");
    }

    #[test]
    fn subgroup_arithmetic_capabilities() {
        let src = r#"#version 450
#extension GL_KHR_shader_subgroup_arithmetic : require
layout(local_size_x = 64) in;
layout(binding = 0) buffer B { float d[]; };
void main() { uint i = gl_GlobalInvocationID.x; d[i] = subgroupAdd(d[i]); }
"#;
        let Some(spv) = glslc("subgroup", src, "vulkan1.2") else { return };
        let names = cap_names(&reflect(&spv).unwrap());
        assert!(names.contains(&"GroupNonUniform"), "{names:?}");
        assert!(names.contains(&"GroupNonUniformArithmetic"), "{names:?}");
    }

    #[test]
    fn no_push_constants_is_none() {
        let src = "#version 450\nlayout(local_size_x = 8) in;\nlayout(binding = 0) buffer B { uint d[]; };\n\
                   void main() { d[gl_GlobalInvocationID.x] = 1u; }\n";
        let Some(spv) = glslc("no_push", src, "vulkan1.2") else { return };
        assert_eq!(reflect(&spv).unwrap().push_constant_bytes, None);
    }

    #[test]
    fn capability_names_match_the_spec() {
        let table = [
            (0, "Matrix"),
            (1, "Shader"),
            (9, "Float16"),
            (10, "Float64"),
            (11, "Int64"),
            (22, "Int16"),
            (39, "Int8"),
            (61, "GroupNonUniform"),
            (62, "GroupNonUniformVote"),
            (63, "GroupNonUniformArithmetic"),
            (64, "GroupNonUniformBallot"),
            (65, "GroupNonUniformShuffle"),
            (66, "GroupNonUniformShuffleRelative"),
            (67, "GroupNonUniformClustered"),
            (68, "GroupNonUniformQuad"),
            (4433, "StorageBuffer16BitAccess"),
            (4434, "UniformAndStorageBuffer16BitAccess"),
            (4435, "StoragePushConstant16"),
            (4448, "StorageBuffer8BitAccess"),
            (4449, "UniformAndStorageBuffer8BitAccess"),
            (4450, "StoragePushConstant8"),
            (5116, "BFloat16TypeKHR"),
            (5345, "VulkanMemoryModel"),
            (5347, "PhysicalStorageBufferAddresses"),
            (6016, "DotProductInputAll"),
            (6017, "DotProductInput4x8Bit"),
            (6018, "DotProductInput4x8BitPacked"),
            (6019, "DotProduct"),
            (6022, "CooperativeMatrixKHR"),
        ];
        for (cap, name) in table {
            assert_eq!(capability_name(cap), Some(name), "capability {cap}");
        }
        assert_eq!(capability_name(16), None);
    }

    // ---- hand-made modules ----

    /// A tiny assembler: header (with the given id bound) + instructions.
    struct Asm(Vec<u32>);

    impl Asm {
        fn new(bound: u32) -> Self {
            Asm(vec![MAGIC, 0x0001_0500, 0, bound, 0])
        }
        fn inst(mut self, opcode: u32, operands: &[u32]) -> Self {
            self.0.push(((operands.len() as u32 + 1) << 16) | opcode);
            self.0.extend_from_slice(operands);
            self
        }
        fn bytes(&self) -> Vec<u8> {
            self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
        }
    }

    fn string(s: &str) -> Vec<u32> {
        let mut bytes = s.as_bytes().to_vec();
        bytes.resize((bytes.len() / 4 + 1) * 4, 0);
        bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Capability Shader, memory model, GLCompute entry point %1 "main".
    fn preamble(bound: u32) -> Asm {
        let mut entry = vec![5, 1];
        entry.extend(string("main"));
        Asm::new(bound).inst(op::CAPABILITY, &[1]).inst(14, &[0, 1]).inst(op::ENTRY_POINT, &entry)
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(reflect(&[]), Err(ReflectError::TooShort { len: 0 }));
        let mut bad_magic = Asm::new(10).bytes();
        bad_magic[0] = 0x42;
        let err = reflect(&bad_magic).unwrap_err();
        assert!(matches!(err, ReflectError::BadMagic { .. }), "{err:?}");
        assert!(err.to_string().starts_with("not SPIR-V: magic number 0x"), "{err}");
        let mut unaligned = Asm::new(10).bytes();
        unaligned.push(0);
        assert_eq!(reflect(&unaligned), Err(ReflectError::NotWordAligned { len: 21 }));
    }

    #[test]
    fn truncated_instruction() {
        let mut m = preamble(10);
        m.0.push((5 << 16) | op::CAPABILITY); // claims 5 words, 1 present
        let at = m.0.len() - 1;
        let err = reflect(&m.bytes()).unwrap_err();
        assert!(matches!(err, ReflectError::TruncatedInstruction { word, .. } if word == at), "{err:?}");
        assert!(err.to_string().starts_with(&format!("truncated instruction at word {at}")), "{err}");
    }

    #[test]
    fn zero_word_count() {
        let mut m = preamble(10);
        m.0.extend([op::CAPABILITY, 1]);
        assert_eq!(reflect(&m.bytes()), Err(ReflectError::ZeroWordCount { word: m.0.len() - 2 }));
    }

    #[test]
    fn id_past_the_bound() {
        let mut name = vec![42];
        name.extend(string("x"));
        let m = preamble(10).inst(op::NAME, &name);
        let err = reflect(&m.bytes()).unwrap_err();
        assert!(matches!(err, ReflectError::IdOutOfBounds { id: 42, bound: 10, .. }), "{err:?}");
        let m = preamble(10).inst(op::TYPE_BOOL, &[0]);
        assert!(matches!(reflect(&m.bytes()), Err(ReflectError::ZeroId { .. })));
    }

    #[test]
    fn unterminated_string() {
        let m = Asm::new(10).inst(op::EXTENSION, &[u32::from_le_bytes(*b"SPV_")]);
        assert!(matches!(reflect(&m.bytes()), Err(ReflectError::BadString { .. })));
    }

    #[test]
    fn local_size_id_execution_mode() {
        // %2 uint, %3 = OpConstant 16, %4 = OpSpecConstant 8 (SpecId 7), ExecutionModeId LocalSizeId.
        let m = preamble(10)
            .inst(op::EXECUTION_MODE_ID, &[1, MODE_LOCAL_SIZE_ID, 4, 3, 3])
            .inst(op::DECORATE, &[4, deco::SPEC_ID, 7])
            .inst(op::TYPE_INT, &[2, 32, 0])
            .inst(op::CONSTANT, &[2, 3, 16])
            .inst(op::SPEC_CONSTANT, &[2, 4, 8]);
        let r = reflect(&m.bytes()).unwrap();
        assert_eq!(
            r.local_size,
            LocalSize { x: Dim::Spec { id: 7, default: 8 }, y: Dim::Literal(16), z: Dim::Literal(16) }
        );
        assert_eq!(
            r.spec_constants,
            [SpecConstant { id: 7, name: None, kind: SpecKind::Int { width: 32, signed: false, default: 8 } }]
        );
    }

    #[test]
    fn workgroup_size_builtin_overrides_local_size() {
        let m = preamble(10)
            .inst(op::EXECUTION_MODE, &[1, MODE_LOCAL_SIZE, 1, 1, 1])
            .inst(op::DECORATE, &[5, deco::BUILT_IN, BUILTIN_WORKGROUP_SIZE])
            .inst(op::TYPE_INT, &[2, 32, 0])
            .inst(op::TYPE_VECTOR, &[3, 2, 3])
            .inst(op::CONSTANT, &[2, 4, 32])
            .inst(op::CONSTANT_COMPOSITE, &[3, 5, 4, 4, 4]);
        let r = reflect(&m.bytes()).unwrap();
        assert_eq!(r.local_size, LocalSize { x: Dim::Literal(32), y: Dim::Literal(32), z: Dim::Literal(32) });
    }

    #[test]
    fn no_compute_entry_point_or_local_size() {
        let m = Asm::new(10).inst(op::CAPABILITY, &[1]);
        assert!(matches!(reflect(&m.bytes()), Err(ReflectError::NoComputeEntryPoint { .. })));
        assert!(matches!(reflect(&preamble(10).bytes()), Err(ReflectError::NoLocalSize { .. })));
    }

    /// A module whose push-constant block is struct %5 with the given member type (%4).
    fn push_constant_module(member_type: &[(u32, &[u32])]) -> Asm {
        let mut m = preamble(20)
            .inst(op::EXECUTION_MODE, &[1, MODE_LOCAL_SIZE, 1, 1, 1])
            .inst(op::MEMBER_DECORATE, &[5, 0, deco::OFFSET, 0])
            .inst(op::TYPE_INT, &[2, 32, 0]);
        for (opcode, operands) in member_type {
            m = m.inst(*opcode, operands);
        }
        m.inst(op::TYPE_POINTER, &[6, sc::PUSH_CONSTANT, 5]).inst(op::VARIABLE, &[6, 7, sc::PUSH_CONSTANT])
    }

    #[test]
    fn push_constant_runtime_array_is_an_error() {
        let m = push_constant_module(&[(op::TYPE_RUNTIME_ARRAY, &[4, 2]), (op::TYPE_STRUCT, &[5, 4])]);
        assert!(matches!(reflect(&m.bytes()), Err(ReflectError::RuntimeArray { member: 0, .. })));
    }

    #[test]
    fn push_constant_self_referencing_struct_is_an_error() {
        // %5 = struct { %4 }, %4 = array of %5: a cycle that valid SPIR-V cannot express.
        let m = push_constant_module(&[
            (op::CONSTANT, &[2, 3, 2]),
            (op::TYPE_ARRAY, &[4, 5, 3]),
            (op::TYPE_STRUCT, &[5, 4]),
            (op::MEMBER_DECORATE, &[5, 0, deco::OFFSET, 0]),
        ]);
        let err = reflect(&m.bytes()).unwrap_err();
        assert!(matches!(err, ReflectError::TypeTooDeep { .. } | ReflectError::MissingOffset { .. }), "{err:?}");
    }

    #[test]
    fn push_constant_missing_offset_is_an_error() {
        let m = preamble(20)
            .inst(op::EXECUTION_MODE, &[1, MODE_LOCAL_SIZE, 1, 1, 1])
            .inst(op::TYPE_INT, &[2, 32, 0])
            .inst(op::TYPE_STRUCT, &[5, 2])
            .inst(op::TYPE_POINTER, &[6, sc::PUSH_CONSTANT, 5])
            .inst(op::VARIABLE, &[6, 7, sc::PUSH_CONSTANT]);
        assert!(matches!(reflect(&m.bytes()), Err(ReflectError::MissingOffset { member: 0, .. })));
    }

    #[test]
    fn push_constant_physical_pointer_is_eight_bytes() {
        let m = push_constant_module(&[
            (op::TYPE_POINTER, &[4, sc::PHYSICAL_STORAGE_BUFFER, 2]),
            (op::TYPE_STRUCT, &[5, 4, 2]),
            (op::MEMBER_DECORATE, &[5, 1, deco::OFFSET, 8]),
        ]);
        assert_eq!(reflect(&m.bytes()).unwrap().push_constant_bytes, Some(12));
    }

    /// Deterministic xorshift64*.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn corrupted_modules_never_panic() {
        let src = r#"#version 450
#extension GL_KHR_shader_subgroup_arithmetic : require
layout(local_size_x_id = 0, local_size_y = 2) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const float Scale = 0.5;
layout(constant_id = 2) const bool Flag = true;
struct Inner { vec3 v; float w; };
layout(push_constant) uniform PC { uint n; mat2 m; Inner inner[2]; float arr[3]; } pc;
layout(binding = 0) readonly buffer A { float a[]; };
layout(set = 1, binding = 2) writeonly buffer O { vec4 o[]; } out_buf;
layout(binding = 3) uniform U { vec4 u; };
void main() {
    uint i = gl_GlobalInvocationID.x;
    float s = subgroupAdd(a[i]) * Scale + pc.m[1].y + pc.inner[1].w + pc.arr[2] + u.x;
    if (Flag && i < pc.n) { out_buf.o[i] = vec4(s, float(WG), pc.inner[0].v.x, 0.0); }
}
"#;
        let Some(spv) = glslc("fuzz", src, "vulkan1.2") else { return };
        let clean = reflect(&spv).unwrap();
        // n@0, mat2@8 (stride 8), inner@32 (stride 16), arr@64 (stride 4).
        assert_eq!(clean.push_constant_bytes, Some(76));
        let words: Vec<u32> = spv.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut err) = (0, 0);
        for round in 0..2000 {
            let mut w = words.clone();
            let at = rng.below(w.len());
            let mut bytes = match round % 5 {
                // Any value.
                0 => {
                    w[at] = rng.next() as u32;
                    None
                }
                // A small value: likely an id, a decoration or a count.
                1 => {
                    w[at] = rng.below(64) as u32;
                    None
                }
                // One bit flipped.
                2 => {
                    w[at] ^= 1 << rng.below(32);
                    None
                }
                // A truncation at any byte.
                3 => Some(spv[..rng.below(spv.len())].to_vec()),
                // A word count changed, keeping the opcode.
                _ => {
                    w[at] = (w[at] & 0xffff) | ((rng.below(12) as u32) << 16);
                    None
                }
            }
            .unwrap_or_else(|| w.iter().flat_map(|x| x.to_le_bytes()).collect());
            match reflect(&bytes) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    err += 1;
                }
            }
            bytes.clear();
        }
        println!("corrupted modules: {ok} reflected, {err} rejected");
        assert!(err > 0 && ok > 0);
    }
}
